"""A small validator for the ClusterPolicyStatus CRD's openAPIV3Schema (no jsonschema dependency).

Checks what the API server checks for the keywords our CRD uses: ``type``,
``properties`` (unknown fields are errors: a structural schema would prune them,
so the written value would not read back), ``required``, ``enum``, ``pattern``,
``minLength``/``maxLength``, ``minItems``/``maxItems``, ``minimum``/``maximum``,
``format`` (int32, int64, date-time) and ``x-kubernetes-list-type: map`` key
uniqueness. Any other keyword fails loudly, so a schema change cannot make the
checker silently lenient.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[3]
CRD = REPO / "crds" / "clusterpolicystatus.yaml"

_KNOWN = {
    "type", "description", "properties", "required", "items", "enum", "pattern", "minLength", "maxLength",
    "minItems", "maxItems", "minimum", "maximum", "format", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}
_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def load_schema(version: str = "v1alpha1", path: Path = CRD) -> dict[str, Any]:
    """The openAPIV3Schema of ``version`` (the controller writes v1alpha1)."""
    crd = yaml.safe_load(path.read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(version)


def status_schema(version: str = "v1alpha1") -> dict[str, Any]:
    schema: dict[str, Any] = load_schema(version)["properties"]["status"]
    return schema


def violations(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Every way ``value`` breaks ``schema`` (empty: valid)."""
    unknown = set(schema) - _KNOWN
    if unknown:
        raise ValueError(f"{path or '.'}: checker does not know schema keywords {sorted(unknown)}")
    out: list[str] = []
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind is not None and not checks[kind](value):
        return [f"{path}: {type(value).__name__} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            out.append(f"{path}: length {len(value)} > maxLength {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            out.append(f"{path}: length {len(value)} < minLength {schema['minLength']}")
        if "pattern" in schema and not re.search(_go_anchors(schema["pattern"]), value):
            out.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "date-time" and not _valid_time(value):
            out.append(f"{path}: {value!r} is not a date-time")
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = _RANGES.get(schema.get("format", ""), (None, None))
        low = schema.get("minimum", low)
        high = schema.get("maximum", high)
        if low is not None and value < low:
            out.append(f"{path}: {value} < {low}")
        if high is not None and value > high:
            out.append(f"{path}: {value} > {high}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            out.append(f"{path}: {len(value)} items > maxItems {schema['maxItems']}")
        if len(value) < schema.get("minItems", 0):
            out.append(f"{path}: {len(value)} items < minItems {schema['minItems']}")
        for i, item in enumerate(value):
            out += violations(item, schema.get("items", {}), f"{path}[{i}]")
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema["x-kubernetes-list-map-keys"]
            seen = [tuple(item.get(k) for k in keys) for item in value if isinstance(item, dict)]
            if len(seen) != len(set(seen)):
                out.append(f"{path}: duplicate list-map keys {keys}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{path}.{k}: required" for k in schema.get("required", ()) if k not in value]
        for key, item in value.items():
            if key not in props:
                out.append(f"{path}.{key}: unknown field (the API server would prune it)")
            else:
                out += violations(item, props[key], f"{path}.{key}")
    return out


def _valid_time(text: str) -> bool:
    if not _DATE_TIME.match(text):
        return False
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _go_anchors(pattern: str) -> str:
    """Go's ``$`` (no multi-line flag) matches only at the very end; Python's also before a final newline."""
    return pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern
