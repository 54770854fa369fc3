#!/usr/bin/env bash
# Copy the CRDs from crds/ (the single source of truth: the FineTuneJob CRD and kopf's
# peering CRDs) into the Helm chart's crds/ folder.
#
#   hack/sync-chart-crds.sh          copy crds/*.yaml -> charts/kubetune/crds/, remove copies
#                                    whose source is gone
#   hack/sync-chart-crds.sh --check  change nothing; exit 1 and name the files that drifted
#
# tests/chart/test_crd_sync.py runs the --check mode.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
src="$repo/crds"
dst="$repo/charts/kubetune/crds"
check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

shopt -s nullglob
sources=("$src"/*.yaml)
if [ ${#sources[@]} -eq 0 ]; then
  echo "sync-chart-crds: no CRDs in $src" >&2
  exit 1
fi

drift=0
for file in "${sources[@]}"; do
  name="$(basename "$file")"
  if ! cmp -s "$file" "$dst/$name"; then
    drift=1
    if [ $check -eq 1 ]; then
      echo "sync-chart-crds: charts/kubetune/crds/$name differs from crds/$name" >&2
    else
      mkdir -p "$dst"
      cp "$file" "$dst/$name"
      echo "sync-chart-crds: copied crds/$name"
    fi
  fi
done

for copy in "$dst"/*.yaml; do
  name="$(basename "$copy")"
  if [ ! -e "$src/$name" ]; then
    drift=1
    if [ $check -eq 1 ]; then
      echo "sync-chart-crds: charts/kubetune/crds/$name has no source in crds/" >&2
    else
      rm "$copy"
      echo "sync-chart-crds: removed charts/kubetune/crds/$name (gone from crds/)"
    fi
  fi
done

if [ $check -eq 1 ] && [ $drift -eq 1 ]; then
  echo "sync-chart-crds: run hack/sync-chart-crds.sh to update the chart" >&2
  exit 1
fi
if [ $drift -eq 0 ]; then
  echo "sync-chart-crds: chart CRDs match crds/"
fi
