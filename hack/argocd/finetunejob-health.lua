-- Argo CD health check for kubetune.dev/FineTuneJob.
--
-- Install it under the argocd-cm key
--   resource.customizations.health.kubetune.dev_FineTuneJob
-- (see docs/install.md and examples/argocd/argocd-cm.yaml, which also carries the resource actions
-- of hack/argocd/actions/).
--
-- Argo CD runs this with the live object in `obj` and expects a table {status=..., message=...}.
-- status.phase is the primary signal; status.conditions (metav1.Condition shape, types
-- Created, Running, Suspended, Succeeded, Failed) refine it:
--
--   no status yet, or status.observedGeneration < metadata.generation  -> Progressing
--   Failed, or condition Failed=True                                   -> Degraded
--   not finished, but stuck on a reason that needs a human               -> Degraded
--   Succeeded, or condition Succeeded=True                             -> Healthy
--   Cancelled, or condition Cancelled=True                             -> Suspended ("Cancelled: ...")
--   Suspended, or condition Suspended=True                             -> Suspended
--   Pending / Queued / Running                                         -> Progressing
--   any other phase                                                    -> Unknown
--   no object at all                                                   -> Missing
--
-- The message carries the failure reason (status.reason / the Failed condition), the output
-- URI on success, or the training progress while running.
--
-- Cancelled (spec.cancel) is Suspended, its message starting "Cancelled:": stopped on purpose,
-- nothing is broken (Degraded would alert for a deliberate act, and read like a failure), yet it
-- will never produce its adapter (so not Healthy: a later sync wave must not proceed as if it
-- had). Argo CD has no terminal-but-stopped status; Suspended is its word for "stopped on
-- purpose", and the Actions menu offers no resume for it (hack/argocd/actions/discovery.lua).
--
-- A FineTuneJob that is Progressing keeps its Argo CD Application Progressing until the run
-- ends, so a sync wave after it only starts once the adapter has been written.

-- The warning reasons of a job that has not ended (kubetune_api.reasons: warning, phase Pending):
-- the trainer pod cannot start until someone fixes the image or a Secret reference, raises a
-- quota (CreateRefused), or upgrades an operator older than its CRD (InvalidSpec).
-- tests/chart/test_argocd_health.py fails when this list and the enum differ.
local NEEDS_A_HUMAN = {
  CreateContainerConfigError = true,
  CreateRefused = true,
  CreateContainerError = true,
  ErrImageNeverPull = true,
  ErrImagePull = true,
  ImagePullBackOff = true,
  InvalidImageName = true,
  InvalidSpec = true,
  RunContainerError = true,
  ServiceAccountMissing = true,
}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function detail(c)
  if c == nil then
    return nil
  end
  if c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  return c.reason
end

local function progress(status)
  if status.progressSummary ~= nil and status.progressSummary ~= "" then
    return " (" .. status.progressSummary .. ")"
  end
  local p = status.progress
  if p == nil or p.step == nil then
    return ""
  end
  local text = " (step " .. tostring(p.step)
  if p.totalSteps ~= nil then
    text = text .. "/" .. tostring(p.totalSteps)
  end
  return text .. ")"
end

local function health(o)
  local hs = {}
  if o == nil then
    hs.status = "Missing"
    hs.message = "FineTuneJob not found"
    return hs
  end
  local status = o.status
  if status == nil or status.phase == nil or status.phase == "" then
    hs.status = "Progressing"
    hs.message = "Waiting for the kubetune operator to pick up the FineTuneJob"
    return hs
  end

  local generation = o.metadata and o.metadata.generation
  if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
    hs.status = "Progressing"
    hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    return hs
  end

  local phase = status.phase
  local failed = condition(status, "Failed")
  local succeeded = condition(status, "Succeeded")
  local suspended = condition(status, "Suspended")
  local cancelled = condition(status, "Cancelled")

  if phase == "Failed" or is_true(failed) then
    hs.status = "Degraded"
    local why = detail(failed)
    if why == nil and status.reason ~= nil and status.reason ~= "" then
      why = status.reason
      if status.message ~= nil and status.message ~= "" then
        why = why .. ": " .. status.message
      end
    end
    hs.message = why or "FineTuneJob failed"
    return hs
  end

  if phase == "Succeeded" or is_true(succeeded) then
    hs.status = "Healthy"
    if status.outputURI ~= nil then
      hs.message = "Adapter written to " .. status.outputURI
    else
      hs.message = detail(succeeded) or "FineTuneJob succeeded"
    end
    return hs
  end

  if phase == "Cancelled" or is_true(cancelled) then
    hs.status = "Suspended"
    local why = detail(cancelled)
    if why == nil and status.message ~= nil and status.message ~= "" then
      why = status.message
    end
    hs.message = "Cancelled: " .. (why or "cancelled by spec.cancel; it never runs again")
    return hs
  end

  if NEEDS_A_HUMAN[status.reason] then
    hs.status = "Degraded"
    hs.message = phase .. ": " .. status.reason
    if status.message ~= nil and status.message ~= "" then
      hs.message = hs.message .. ": " .. status.message
    end
    return hs
  end

  -- The phase decides before the Suspended condition: a Kueue-queued job is suspended at the
  -- Job level (Suspended=True) while waiting for admission, yet it is progressing.
  if phase == "Pending" or phase == "Queued" or phase == "Running" then
    hs.status = "Progressing"
    hs.message = phase .. progress(status)
    return hs
  end

  if phase == "Suspended" or is_true(suspended) then
    hs.status = "Suspended"
    hs.message = detail(suspended) or "FineTuneJob is suspended (spec.suspend: true)"
    return hs
  end

  hs.status = "Unknown"
  hs.message = "Unrecognised phase " .. tostring(phase)
  return hs
end

return health(obj)
