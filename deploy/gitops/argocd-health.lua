-- Argo CD health check for kubemaas.io/ModelDeployment, built on the status conditions only.
-- Install it under the argocd-cm key `resource.customizations.health.kubemaas.io_ModelDeployment`
-- (see argocd-cm-patch.yaml). Degraded: a failing container, a model that cannot load or a rollout
-- that cannot progress; Healthy: Ready=True for the current generation; Suspended: scaled to zero
-- replicas; everything else is Progressing, with the reason.
local hs = {status = "Progressing", message = "Waiting for the KubeMaaS operator to report status"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local conditions = {}
for _, c in ipairs(obj.status.conditions) do
  conditions[c.type] = c
end
local degraded = conditions["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  return {status = "Degraded", message = degraded.reason .. ": " .. degraded.message}
end
local loaded = conditions["ModelLoaded"]
if loaded ~= nil and loaded.status == "False" and loaded.reason ~= "ScaledToZero" then
  return {status = "Degraded", message = loaded.reason .. ": " .. loaded.message}
end
local ready = conditions["Ready"]
if ready ~= nil then
  if ready.reason == "InvalidSpec" or ready.reason == "RolloutStuck" then
    return {status = "Degraded", message = ready.reason .. ": " .. ready.message}
  end
  if ready.reason == "ScaledToZero" then
    return {status = "Suspended", message = ready.message}
  end
  local current = obj.status.observedGeneration == obj.metadata.generation
  if ready.status == "True" and current then
    return {status = "Healthy", message = ready.message}
  end
  hs.message = ready.reason .. ": " .. ready.message
end
local scheduled = conditions["Scheduled"]
if scheduled ~= nil and scheduled.status == "False" then
  hs.message = scheduled.reason .. ": " .. scheduled.message
end
return hs
