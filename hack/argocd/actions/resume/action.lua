-- Resume a suspended FineTuneJob from its newest complete checkpoint (spec.suspend: false).
if obj.spec == nil then
  obj.spec = {}
end
obj.spec.suspend = false
return obj
