-- Argo CD health of a testrun.dev TestRun: Healthy once it succeeded,
-- Degraded once it ended otherwise or cannot go on until someone acts (an
-- invalid spec, a missing preset), Progressing until then.
local hs = {}

local function condition(type_)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function said(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to look at the run"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to look at the latest spec"
  return hs
end

local complete = condition("Complete")
if complete ~= nil and complete.status == "True" then
  hs.status = "Healthy"
  hs.message = said(complete)
  return hs
end
local failed = condition("Failed")
if failed ~= nil and failed.status == "True" then
  hs.status = "Degraded"
  hs.message = said(failed)
  return hs
end
local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = said(stalled)
  return hs
end

-- Controllers older than the Complete and Failed conditions: the phase.
local phase = obj.status.phase
if complete == nil and phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded"
  return hs
end
if failed == nil and (phase == "Failed" or phase == "TimedOut" or phase == "Cancelled" or phase == "Error") then
  hs.status = "Degraded"
  hs.message = phase
  return hs
end

hs.status = "Progressing"
local ready = condition("Ready")
if ready ~= nil then
  hs.message = said(ready)
else
  hs.message = phase or "Pending"
end
return hs
