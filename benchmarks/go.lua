-- Activation clicks from many users (so per-user rate limits are checked but not hit), each with a
-- deep link, as a browser would send them.
local tokens = {}
local path_prefix = os.getenv("GO_PATH") or "/go/aliexpress"
for line in io.lines(os.getenv("TOKENS_FILE")) do tokens[#tokens + 1] = line end
local i = 0
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"

-- GO_DELAY_MS: each connection waits that long between its requests (a paced load below saturation).
local think = tonumber(os.getenv("GO_DELAY_MS") or "0")
if think > 0 then
  delay = function() return think end
end

request = function()
  i = i + 1
  local t = tokens[(i % #tokens) + 1]
  return wrk.format("GET", path_prefix .. "?u=" .. t .. "&to=https%3A%2F%2Faliexpress.ru%2Fitem%2F" .. i .. ".html")
end

done = dofile((os.getenv("BENCH_LUA_DIR") or "benchmarks") .. "/report.lua")
