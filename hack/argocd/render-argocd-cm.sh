#!/usr/bin/env bash
# Regenerate examples/argocd/argocd-cm-health.yaml from hack/argocd/finetunejob-health.lua
# (the argocd-cm patch embeds the script verbatim; tests/chart/test_argocd_health.py checks it).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
out="$repo/examples/argocd/argocd-cm-health.yaml"
{
  cat <<'HEADER'
# Argo CD health check for FineTuneJob, as a patch of the argocd-cm ConfigMap.
# The script is hack/argocd/finetunejob-health.lua verbatim (tests/chart/test_argocd_health.py
# fails if the two differ; regenerate with hack/argocd/render-argocd-cm.sh). Apply with:
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file examples/argocd/argocd-cm-health.yaml
# (or put the key into your Argo CD Helm values under configs.cm).
data:
  resource.customizations.health.kubetune.dev_FineTuneJob: |
HEADER
  sed 's/^/    /; s/^ *$//' "$repo/hack/argocd/finetunejob-health.lua"
} > "$out"
echo "wrote ${out#"$repo"/}"
