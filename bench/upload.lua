-- wrk script: every request POSTs one fixed multipart/form-data body.
--
--   wrk -t2 -c8 -d4s --latency -s bench/upload.lua URL -- BODY_FILE
--
-- BODY_FILE holds the whole multipart body (bench/run.py writes it); its first line is
-- "--<boundary>", which gives the Content-Type header. The request is formatted once per
-- thread and sent as is: wrk counts any 4xx/5xx answer under "Non-2xx or 3xx responses".

local request_bytes

function init(args)
   local path = args[1]
   assert(path, "usage: wrk ... -s upload.lua URL -- BODY_FILE")
   local file = assert(io.open(path, "rb"))
   local body = file:read("*a")
   file:close()
   local boundary = assert(body:match("^%-%-([^\r\n]+)\r\n"), "body must start with --boundary")
   local headers = {}
   for name, value in pairs(wrk.headers) do  -- wrk -H headers (an Authorization)
      headers[name] = value
   end
   headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
   request_bytes = wrk.format("POST", nil, headers, body)
end

function request()
   return request_bytes
end
