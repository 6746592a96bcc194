-- Activation clicks from many users (so per-user rate limits are checked but not hit), each with a
-- deep link, as a browser would send them.
local tokens = {}
local path_prefix = os.getenv("GO_PATH") or "/go/aliexpress"
for line in io.lines(os.getenv("TOKENS_FILE")) do tokens[#tokens + 1] = line end
local i = 0
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"

request = function()
  i = i + 1
  local t = tokens[(i % #tokens) + 1]
  return wrk.format("GET", path_prefix .. "?u=" .. t .. "&to=https%3A%2F%2Faliexpress.ru%2Fitem%2F" .. i .. ".html")
end

done = function(summary, latency, requests)
  io.write(string.format("JSON {\"requests\": %d, \"seconds\": %.3f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, " ..
    "\"errors\": %d, \"non_3xx\": %d}\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(99) / 1e3,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
