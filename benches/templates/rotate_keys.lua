-- wrk script for benches/compare.py: each request carries the next key of a key file in
-- x-api-key, rotating through all of them (10,000 in the benchmark).
-- Arguments after `--`: KEYFILE [METHOD [BODY_BYTES [close]]]
--   METHOD      GET (default) or POST
--   BODY_BYTES  a body of that many bytes (POST); then 64 keys rotate, since each prepared
--               request holds the whole body
--   close       send `Connection: close` (a new TLS connection per request)
local reqs = {}
local count = 0
local next_i = 0

function init(args)
  local path = args[1]
  local method = args[2] or "GET"
  local body_bytes = tonumber(args[3] or "0") or 0
  local close = args[4] == "close"
  local body = nil
  if body_bytes > 0 then
    body = string.rep("x", body_bytes)
  end
  local limit = 1000000
  if body then
    limit = 64
  end
  for line in io.lines(path) do
    if #line > 0 and count < limit then
      local headers = { ["x-api-key"] = line }
      if close then
        headers["Connection"] = "close"
      end
      count = count + 1
      reqs[count] = wrk.format(method, nil, headers, body)
    end
  end
  if count == 0 then
    error("no keys in " .. tostring(path))
  end
end

function request()
  next_i = next_i % count + 1
  return reqs[next_i]
end
