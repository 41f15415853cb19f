-- POST one streamed chat completion request (SSE answer) on every connection.
-- Usage: wrk ... -s bench/wrk/stream.lua URL -- BEARER_TOKEN ['Name: value' ...]
-- Like post.lua: no request()/response() functions, so wrk's own cost stays minimal; a
-- request counts when its whole stream (50 chunks, usage, [DONE]) has arrived.

wrk.method = "POST"
wrk.body = '{"model":"bench-stream","messages":[{"role":"user","content":"hi"}],"stream":true,'
  .. '"stream_options":{"include_usage":true}}'
wrk.headers["Content-Type"] = "application/json"

function init(args)
  if args[1] ~= nil then
    wrk.headers["Authorization"] = "Bearer " .. args[1]
  end
  -- Further arguments are extra request headers, "Name: value" (Portkey's routing).
  for i = 2, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    if name ~= nil then
      wrk.headers[name] = value
    end
  end
end
