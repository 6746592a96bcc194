-- POST /v1/observe with a 5-event body (a clean chain on AliExpress), for many clicks and users.
local pairs_ = {}
for line in io.lines(os.getenv("CLICKS_FILE")) do
  local token, cid = line:match("^(%S+) (%S+)$")
  pairs_[#pairs_ + 1] = {token, cid}
end
local i = 0
request = function()
  i = i + 1
  local p = pairs_[(i % #pairs_) + 1]
  local body = '{"click_id":"' .. p[2] .. '","events":[' ..
    '{"type":"navigation","url":"https://aliexpress.ru/item/1005001.html?spm=a2g0o&admitad_uid=abc"},' ..
    '{"type":"navigation","url":"https://aliexpress.ru/item/1005002.html?sku_id=1"},' ..
    '{"type":"navigation","url":"https://aliexpress.ru/cart?utm_source=newsletter"},' ..
    '{"type":"promo_code","code":"MEGA5"},' ..
    '{"type":"checkout","device":"bench-device","basket_items_before_activation":0}]}'
  return wrk.format("POST", "/v1/observe", {["Authorization"] = "Bearer " .. p[1],
    ["Content-Type"] = "application/json"}, body)
end
done = dofile((os.getenv("BENCH_LUA_DIR") or "benchmarks") .. "/report.lua")
