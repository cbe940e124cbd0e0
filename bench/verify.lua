-- wrk script: GET /v1/verify cycling through the tokens listed (one a line) in the file named
-- by the environment variable BENCH_TOKENS. Each thread starts at its own random offset. `done` prints
-- one JSON line prefixed with BENCH_JSON that bench/loadgen.py parses.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("thread_index", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local path = os.getenv("BENCH_TOKENS")
   local nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
   requests_list = {}
   for line in io.lines(path) do
      if #line > 0 then
         requests_list[#requests_list + 1] =
            wrk.format("GET", "/v1/verify", { ["X-API-Key"] = line })
      end
   end
   total = #requests_list
   -- A random start, so that repeated runs do not all begin on the keys filled longest ago.
   math.randomseed(os.time() * 1000 + thread_index)
   position = (math.floor(thread_index * total / nthreads) + math.random(0, total - 1)) % total
end

function request()
   position = position + 1
   if position > total then
      position = 1
   end
   return requests_list[position]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,' ..
      '"errors_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
      '"max_us":%d,"mean_us":%.1f}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency:percentile(99.9), latency.max, latency.mean))
end

-- Paced mode (BENCH_DELAY_MS set): each connection waits a random 0.5-1.5 times that many
-- milliseconds after each answer, which holds the total rate near connections / delay. wrk then
-- times each request from its actual send (a stalled server is partly hidden, unlike wrk2).
if os.getenv("BENCH_DELAY_MS") then
   local pause = tonumber(os.getenv("BENCH_DELAY_MS"))
   function delay()
      return math.floor(pause * (0.5 + math.random()))
   end
end
