#!/usr/bin/env bash
# Regenerate helm/netfence/README.md from Chart.yaml, README.md.gotmpl and the
# "# --" comments in values.yaml with helm-docs (built from the pinned Go
# module in hack/tools/helm-docs by hack/build-tools.sh, cached outside the
# checkout). A value without a "# --" comment gets an empty description in
# the table: tests/unit/test_chart_files.py fails on that (helm-docs' own
# strict mode only knows the old "# key -- text" comment style).
#
#   hack/chart-readme.sh           write the README
#   hack/chart-readme.sh --check   print what differs and fail if the README is stale
#
# tests/unit/test_chart_files.py runs the check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bin="$(hack/build-tools.sh helm-docs)"
chart=helm/netfence
args=(--chart-search-root "$chart" --sort-values-order file --log-level warning)
if [[ ${1:-} == --check ]]; then
  want="$("$bin/helm-docs" "${args[@]}" --dry-run)"
  if ! diff -u "$chart/README.md" <(printf '%s\n' "$want"); then
    echo "netfence: $chart/README.md is stale: run hack/chart-readme.sh" >&2
    exit 1
  fi
else
  "$bin/helm-docs" "${args[@]}"
fi
