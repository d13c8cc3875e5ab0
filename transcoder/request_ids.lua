-- flowport's mark on calls that are safe to retry because they carry a request id.
--
-- A create call (CreateExecution, CreateSession, ...) is not idempotent, but
-- one with a `request_id` is: the server answers a repeat with what the
-- first call made. Envoy's routes cannot see into a body, so this filter,
-- after the transcoder (REST bodies are gRPC messages by then), reads the
-- top level of the message and, when its `request_id` is set, adds
-- MARK_HEADER and has the route picked again: that method's route with the
-- header retries a reset or an UNAVAILABLE on another server, as idempotent
-- calls' routes do (transcoder/envoy_routes.py).
--
-- REQUEST_ID_FIELDS[gRPC path] = the request_id field's number, and
-- MARK_HEADER, are written in front of this code by transcoder/request_ids.py
-- (the table from the descriptor set).

-- The varint at i of s, and the index after it; nil when it runs off the end.
local function varint(s, i)
  local value, scale = 0, 1
  while i <= #s do
    local b = string.byte(s, i)
    value = value + (b % 128) * scale
    i = i + 1
    if b < 128 then
      return value, i
    end
    scale = scale * 128
    if scale > 2 ^ 63 then
      return nil
    end
  end
  return nil
end

-- Whether the first gRPC message of `s` sets length-delimited field `number`
-- (non-empty) at its top level. The last occurrence counts, as when parsing;
-- a compressed or malformed message never does.
local function sets_field(s, number)
  if #s < 5 or string.byte(s, 1) ~= 0 then
    return false
  end
  local b2, b3, b4, b5 = string.byte(s, 2, 5)
  local stop = 5 + ((b2 * 256 + b3) * 256 + b4) * 256 + b5
  if stop > #s then
    return false
  end
  local i, set = 6, false
  while i <= stop do
    local key
    key, i = varint(s, i)
    if key == nil then
      return false
    end
    local wire, field = key % 8, math.floor(key / 8)
    if wire == 0 then
      local _
      _, i = varint(s, i)
      if i == nil then
        return false
      end
    elseif wire == 1 then
      i = i + 8
    elseif wire == 5 then
      i = i + 4
    elseif wire == 2 then
      local size
      size, i = varint(s, i)
      if size == nil then
        return false
      end
      if field == number then
        set = size > 0
      end
      i = i + size
    else
      return false -- groups: no flowport message has them
    end
  end
  return set and i == stop + 1
end

function envoy_on_request(request_handle)
  local number = REQUEST_ID_FIELDS[request_handle:headers():get(":path") or ""]
  if number == nil then
    return
  end
  local body = request_handle:body()
  if body == nil or body:length() == 0 then
    return
  end
  if sets_field(body:getBytes(0, body:length()), number) then
    -- The headers are held back until the body is in, so they may still change;
    -- a handle taken before body() is no longer valid after it.
    request_handle:headers():replace(MARK_HEADER, "1")
    request_handle:clearRouteCache()
  end
end
