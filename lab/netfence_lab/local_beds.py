"""Running local test beds, for ``netfence status`` and ``netfence explain`` without flags.

Registered as the entry point ``netfence.local_beds`` (``lab/pyproject.toml``).
"""

from __future__ import annotations

from pathlib import Path

from netfence.cli_options import LocalBed


def local_beds(demo_dir: Path | None = None) -> list[LocalBed]:
    """The running local test beds, the kept demo first."""
    import json

    from netfence_lab.cli_cluster import default_dir
    from netfence_lab.cluster import read_state

    demo = demo_dir or default_dir().parent / "demo"
    out: list[LocalBed] = []
    for directory, what in ((demo / "cluster", f"the demo kept running in {demo}"),
                            (default_dir(), f"the local cluster in {default_dir()}")):
        state = read_state(directory)
        if state is None or not state.running():
            continue
        nodes: dict[str, str] = {}
        kept = directory.parent / "demo.json"
        if what.startswith("the demo") and kept.is_file():
            recorded = json.loads(kept.read_text())
            nodes = dict(recorded.get("nodes") or {})
            prefix = recorded.get("fabric")
            if not nodes and prefix:  # demo.json of an earlier version: node-<i> runs in <prefix>-n<i>
                nodes = {f"node-{i}": f"{prefix}-n{i}" for i in range(2)}
        out.append(LocalBed(state.netfence_etcd.removeprefix("http://"), Path(state.kubeconfig), nodes, what))
    return out
