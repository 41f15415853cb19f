-- POST one small chat completion request on every connection, as an OpenAI client would.
-- Usage: wrk ... -s bench/wrk/post.lua URL -- BEARER_TOKEN ['Name: value' ...]
-- The token is a script argument (not baked in here) because each run creates a new key.
-- No request()/response() functions are defined, so wrk builds the request once per
-- thread and its own overhead stays minimal.

wrk.method = "POST"
wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
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
