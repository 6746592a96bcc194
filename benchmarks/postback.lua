-- GET /postback/admitad: new orders (a fresh order id per request) or, with DUPLICATES=1, the same few.
local cids = {}
for line in io.lines(os.getenv("CLICKS_FILE")) do
  local _, cid = line:match("^(%S+) (%S+)$")
  cids[#cids + 1] = cid
end
local dup = os.getenv("DUPLICATES") == "1"
-- DELAY_MS: each connection waits that long between its requests (a paced load below saturation).
local think = tonumber(os.getenv("DELAY_MS") or "0")
if think > 0 then
  delay = function() return think end
end
local counter = 0
local tid = 0
setup = function(thread) tid = tid + 1; thread:set("tid", tid) end
request = function()
  counter = counter + 1
  local order = dup and ("DUP-" .. (counter % 50)) or ("ORD-" .. tostring(tid) .. "-" .. counter .. "-" .. os.time())
  local cid = cids[(counter % #cids) + 1]
  return wrk.format("GET", "/postback/admitad?token=demo-admitad-token-change-me&subid=" .. cid ..
    "&order_id=" .. order .. "&status=pending&payment_sum=12.50&order_sum=250.00&currency=RUB&time=1795660800")
end
done = dofile((os.getenv("BENCH_LUA_DIR") or "benchmarks") .. "/report.lua")
