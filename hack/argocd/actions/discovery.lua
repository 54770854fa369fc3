-- Argo CD resource actions for kubetune.dev/FineTuneJob: which ones the Actions menu offers.
--
-- Installed with the action scripts next to it under the argocd-cm key
--   resource.customizations.actions.kubetune.dev_FineTuneJob
-- (hack/argocd/render-argocd-cm.sh writes examples/argocd/argocd-cm.yaml; see docs/install.md).
-- Argo CD runs this with the live object in `obj` and expects {name = {disabled = bool, ...}}.
--
--   a run that has ended (Succeeded, Failed, Cancelled) or is cancelled   -> no action at all
--   spec.suspend true (Suspended, or created suspended)                   -> resume, cancel
--   otherwise (Pending, Queued, Running, or no status yet)                -> suspend, cancel
--
-- Every action only edits the spec (suspend, cancel); the operator does the rest. spec.cancel
-- cannot be undone (the API server refuses it), and a cancelled job is never resumed.
-- tests/chart/test_argocd_actions.py runs this and each action.lua with a real Lua runtime.

local ENDED = { Succeeded = true, Failed = true, Cancelled = true }

local function discover(o)
  local actions = {}
  local spec = o.spec or {}
  local phase = o.status and o.status.phase
  if spec.cancel == true or ENDED[phase] then
    return actions
  end
  local suspended = spec.suspend == true
  actions["suspend"] = { disabled = suspended, iconClass = "fa fa-fw fa-pause", displayName = "Suspend" }
  actions["resume"] = { disabled = not suspended, iconClass = "fa fa-fw fa-play", displayName = "Resume" }
  actions["cancel"] = { disabled = false, iconClass = "fa fa-fw fa-ban", displayName = "Cancel (for good)" }
  return actions
end

return discover(obj)
