-- One account floods POST /v1/observe: 100 navigation events (~47 KB) per request, every URL full of
-- other networks' parameters with values new to each request, spread over the account's clicks.
local token = os.getenv("FLOOD_TOKEN")
local clicks = {}
for cid in io.lines(os.getenv("FLOOD_CLICKS_FILE")) do clicks[#clicks + 1] = cid end
local params = {"cjevent", "irclickid", "ranmid", "awc", "sscid", "clickref", "admitad_uid", "aff_fcid",
                "tag", "campid", "cuid", "tduid", "wgu", "avad", "gclid", "fbclid", "yclid", "msclkid"}
local n = 0
request = function()
  n = n + 1
  local events = {}
  for e = 1, 100 do
    local q = {}
    for p = 1, #params do q[#q + 1] = params[p] .. "=" .. n .. "x" .. e .. "y" .. p .. string.rep("z", 8) end
    events[#events + 1] = '{"type":"navigation","url":"https://aliexpress.ru/item/' .. e .. '.html?' ..
      table.concat(q, "&") .. '"}'
  end
  local body = '{"click_id":"' .. clicks[(n % #clicks) + 1] .. '","events":[' .. table.concat(events, ",") .. ']}'
  return wrk.format("POST", "/v1/observe", {["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json"}, body)
end
done = dofile((os.getenv("BENCH_LUA_DIR") or "benchmarks") .. "/report.lua")
