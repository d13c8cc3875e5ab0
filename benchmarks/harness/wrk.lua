-- wrk script: optional unique POST bodies, per-answer checks, JSON summary.
--
-- Environment (read once per thread):
--   BENCH_METHOD, BENCH_PATH, BENCH_HEADERS ("Name: value" lines),
--   BENCH_BODY   a body with "%d" where a unique integer goes (empty: no body),
--   BENCH_EXPECT a Lua pattern capturing an integer in the answer that must be
--                that request's integer + 1 (empty: only the status is checked),
--   BENCH_BASE   where this run's integers start (each run of wrk its own range,
--                so no body repeats one a server saw in an earlier run).
-- Each thread gets its own range of integers. wrk cannot tell which request
-- an answer belongs to, so an answer is right when its integer is one this
-- thread sent (plus one) and not answered before.

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  method = os.getenv("BENCH_METHOD") or "GET"
  path = os.getenv("BENCH_PATH") or "/"
  body_format = os.getenv("BENCH_BODY") or ""
  expect = os.getenv("BENCH_EXPECT") or ""
  headers = {}
  for line in string.gmatch(os.getenv("BENCH_HEADERS") or "", "[^\n]+") do
    local name, value = string.match(line, "^([^:]+):%s*(.*)$")
    if name then headers[name] = value end
  end
  counter = tonumber(os.getenv("BENCH_BASE") or "0") + id * 10000000
  pending = {}
  bad = 0
  non2xx = 0
end

function request()
  if body_format == "" then
    return wrk.format(method, path, headers, nil)
  end
  counter = counter + 1
  pending[counter] = true
  return wrk.format(method, path, headers, string.format(body_format, counter))
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    return
  end
  if expect ~= "" then
    local got = tonumber(string.match(body, expect))
    if got ~= nil and pending[got - 1] then
      pending[got - 1] = nil
    else
      bad = bad + 1
      if os.getenv("BENCH_DEBUG") then io.stderr:write("unexpected answer: " .. body .. "\n") end
    end
  end
end

function done(summary, latency, requests)
  local incorrect = 0
  local non2xx_total = 0
  for _, thread in ipairs(threads) do
    incorrect = incorrect + thread:get("bad")
    non2xx_total = non2xx_total + thread:get("non2xx")
  end
  local e = summary.errors
  local cdf = {}
  for i = 1, 99 do
    table.insert(cdf, string.format("[%.3f, %.2f]", latency:percentile(i) / 1000, i / 100))
  end
  table.insert(cdf, string.format("[%.3f, 1.0]", latency.max / 1000))
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "seconds": %.6f, "errors": %d, "incorrect": %d, ' ..
    '"p50": %.3f, "p90": %.3f, "p99": %.3f, "max": %.3f, "cdf": [%s]}\n',
    summary.requests, summary.duration / 1e6,
    e.connect + e.read + e.write + e.timeout + non2xx_total, incorrect,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, table.concat(cdf, ", ")))
end
