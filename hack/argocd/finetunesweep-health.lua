-- Argo CD health check for kubetune.dev/FineTuneSweep.
--
-- Install it under the argocd-cm key
--   resource.customizations.health.kubetune.dev_FineTuneSweep
-- (see docs/install.md and examples/argocd/argocd-cm.yaml, rendered by
-- hack/argocd/render-argocd-cm.sh next to the FineTuneJob's health check).
--
-- Argo CD runs this with the live object in `obj` and expects a table {status=..., message=...}.
-- status.phase is the primary signal (Running, Succeeded, Failed: kubetune_api.sweep_reasons);
-- status.conditions (types Running, Succeeded, Failed) refine it:
--
--   no status yet, or status.observedGeneration < metadata.generation  -> Progressing
--   Failed, or condition Failed=True                                   -> Degraded
--   Running, but stuck on a reason that needs a human                   -> Degraded
--   Succeeded, or condition Succeeded=True                             -> Healthy
--   Running                                                            -> Progressing
--   any other phase                                                    -> Unknown
--   no object at all                                                   -> Missing
--
-- The message names the best trial and its value on success, the reason on failure, and the
-- trials ended/running and best value so far while running. The sweep's own trials are ordinary
-- FineTuneJobs with their own health (finetunejob-health.lua): a pruned or failed trial is not a
-- failed sweep, so the sweep is judged by its own phase only.

-- The warning reasons of a sweep still Running (kubetune_api.sweep_reasons): the API server
-- refuses its trials (a quota, an admission policy) until someone acts; the operator retries.
-- tests/chart/test_argocd_sweep_health.py fails when this list and the operator differ.
local NEEDS_A_HUMAN = {
  TrialRefused = true,
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

local function reason_and_message(status)
  if status.reason == nil or status.reason == "" then
    return status.message
  end
  if status.message ~= nil and status.message ~= "" then
    return status.reason .. ": " .. status.message
  end
  return status.reason
end

local function progress(status)
  local parts = {}
  if status.trialsSummary ~= nil and status.trialsSummary ~= "" then
    table.insert(parts, status.trialsSummary .. " trials ended")
  end
  if status.trialsRunning ~= nil then
    table.insert(parts, tostring(status.trialsRunning) .. " running")
  end
  if status.bestValue ~= nil then
    table.insert(parts, "best " .. tostring(status.bestValue))
  end
  if #parts == 0 then
    return ""
  end
  return " (" .. table.concat(parts, ", ") .. ")"
end

local function health(o)
  local hs = {}
  if o == nil then
    hs.status = "Missing"
    hs.message = "FineTuneSweep not found"
    return hs
  end
  local status = o.status
  if status == nil or status.phase == nil or status.phase == "" then
    hs.status = "Progressing"
    hs.message = "Waiting for the kubetune operator to pick up the FineTuneSweep"
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

  if phase == "Failed" or is_true(failed) then
    hs.status = "Degraded"
    hs.message = detail(failed) or reason_and_message(status) or "FineTuneSweep failed"
    return hs
  end

  if phase == "Succeeded" or is_true(succeeded) then
    hs.status = "Healthy"
    if status.bestTrial ~= nil then
      hs.message = "Best trial " .. status.bestTrial .. ": " .. tostring(status.bestValue)
    else
      hs.message = detail(succeeded) or "FineTuneSweep succeeded"
    end
    return hs
  end

  if NEEDS_A_HUMAN[status.reason] then
    hs.status = "Degraded"
    hs.message = phase .. ": " .. reason_and_message(status)
    return hs
  end

  if phase == "Running" then
    hs.status = "Progressing"
    hs.message = phase .. progress(status)
    return hs
  end

  hs.status = "Unknown"
  hs.message = "Unrecognised phase " .. tostring(phase)
  return hs
end

return health(obj)
