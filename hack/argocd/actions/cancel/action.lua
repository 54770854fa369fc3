-- Cancel a FineTuneJob for good (spec.cancel: true): the trainer Job is deleted (its pod saves a
-- checkpoint on SIGTERM), the FineTuneJob, its status and checkpoints stay, phase Cancelled.
-- It cannot be undone: to train again, create a new FineTuneJob.
if obj.spec == nil then
  obj.spec = {}
end
obj.spec.cancel = true
return obj
