-- One user's token on every request: a flood of activations by a single account.
local token = os.getenv("FLOOD_TOKEN")
wrk.headers["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/130.0 Safari/537.36"

request = function()
  return wrk.format("GET", "/go/aliexpress?u=" .. token)
end

done = dofile((os.getenv("BENCH_LUA_DIR") or "benchmarks") .. "/report.lua")
