-- Suspend a FineTuneJob: the trainer saves a checkpoint on SIGTERM and stops (spec.suspend: true).
if obj.spec == nil then
  obj.spec = {}
end
obj.spec.suspend = true
return obj
