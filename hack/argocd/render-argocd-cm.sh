#!/usr/bin/env bash
# Regenerate examples/argocd/argocd-cm.yaml from hack/argocd/finetunejob-health.lua, the
# resource actions in hack/argocd/actions/ (discovery.lua, <action>/action.lua) and
# hack/argocd/finetunesweep-health.lua: the argocd-cm patch embeds each script verbatim;
# tests/chart/test_argocd_health.py, test_argocd_actions.py and test_argocd_sweep_health.py check it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
here="$repo/hack/argocd"
out="$repo/examples/argocd/argocd-cm.yaml"
# The actions in the order the definitions list them.
actions=(suspend resume cancel)
indent() { sed "s/^/$(printf '%*s' "$1" '')/; s/^ *$//" "$2"; }
{
  cat <<'HEADER'
# Argo CD health check and resource actions (suspend, resume, cancel) for FineTuneJob, and the
# health check for FineTuneSweep, as a patch of the argocd-cm ConfigMap. The scripts are
# hack/argocd/finetunejob-health.lua, hack/argocd/actions/ and hack/argocd/finetunesweep-health.lua
# verbatim (tests/chart/test_argocd_health.py, test_argocd_actions.py and
# test_argocd_sweep_health.py fail if they differ; regenerate with hack/argocd/render-argocd-cm.sh).
# Apply with:
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file examples/argocd/argocd-cm.yaml
# (or put these keys into your Argo CD Helm values under configs.cm).
data:
  resource.customizations.health.kubetune.dev_FineTuneJob: |
HEADER
  indent 4 "$here/finetunejob-health.lua"
  echo "  resource.customizations.actions.kubetune.dev_FineTuneJob: |"
  echo "    discovery.lua: |"
  indent 6 "$here/actions/discovery.lua"
  echo "    definitions:"
  for action in "${actions[@]}"; do
    echo "    - name: $action"
    echo "      action.lua: |"
    indent 8 "$here/actions/$action/action.lua"
  done
  echo "  resource.customizations.health.kubetune.dev_FineTuneSweep: |"
  indent 4 "$here/finetunesweep-health.lua"
} > "$out"
echo "wrote ${out#"$repo"/}"
