-- wrk script: POSTs the JSON bodies of BODIES (one per line) to the URL's path, cycling
-- through them, one body per request. Reports non-2xx responses as errors at the end.
local bodies = {}
local i = 0
local bad = 0

function init(args)
  local file = os.getenv("BODIES")
  for line in io.lines(file) do
    bodies[#bodies + 1] = line
  end
  i = math.random(#bodies)
end

request = function()
  i = i % #bodies + 1
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, bodies[i])
end

response = function(status, headers, body)
  if status ~= 200 then
    bad = bad + 1
    if bad <= 3 then io.stderr:write("status " .. status .. ": " .. body .. "\n") end
  end
end
