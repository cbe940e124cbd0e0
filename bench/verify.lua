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
   -- wrk runs each thread's init before it starts the next thread, and starts its clock after
   -- the last one. When init formatted one request per token (about 390 ms a thread for 100,000
   -- tokens), the first thread loaded the server alone for that long before the clock started
   -- and its requests counted; side by side, the other server's wrk had the core to itself for
   -- that long. So init only reads the file and notes where each token starts and ends (10-17 ms
   -- for 100,000), and each request is put together when it is sent.
   local marker = "\0TOKEN\0"
   local template = wrk.format("GET", "/v1/verify", { ["X-API-Key"] = marker })
   local at = string.find(template, marker, 1, true)
   head = string.sub(template, 1, at - 1)
   tail = string.sub(template, at + #marker)
   local file = assert(io.open(path, "rb"))
   data = file:read("a")
   file:close()
   starts, ends = {}, {}
   local n, from = 0, 1
   while from <= #data do
      local newline = string.find(data, "\n", from, true) or (#data + 1)
      if newline > from then
         n = n + 1
         starts[n], ends[n] = from, newline - 1
      end
      from = newline + 1
   end
   total = n
   -- A random start, so that repeated runs do not all begin on the keys filled longest ago.
   math.randomseed(os.time() * 1000 + thread_index)
   position = (math.floor(thread_index * total / nthreads) + math.random(0, total - 1)) % total
end

function request()
   position = position + 1
   if position > total then
      position = 1
   end
   return head .. string.sub(data, starts[position], ends[position]) .. tail
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
