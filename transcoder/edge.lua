-- flowport's edge filter, first in Envoy's HTTP filter chain.
--
-- Marks REST requests (anything not gRPC or grpc-web) in dynamic metadata,
-- before the transcoder rewrites them into gRPC: local replies use the mark
-- to answer REST callers with JSON, and responses to REST callers lose the
-- grpc-* headers the transcoder leaves on them.
--
-- Server-sent events get what the transcoder does not write (it frames each
-- streamed message as `data: {json}` and a blank line, nothing else): an
-- `id:` line with the event's id, so EventSource and SSE libraries resume by
-- themselves (they send it back as Last-Event-ID), and `event: heartbeat`
-- on heartbeats, so EventSource's onmessage sees events only.
--
-- The transcoder keeps a REST call's method and path in x-envoy-original-method
-- and x-envoy-original-path (the access log shows them, not the POST to the
-- gRPC method it makes of the call); copies a client sent are removed first.
--
-- A browser EventSource cannot send headers, so a GET may carry its
-- credential as `?access_token=`: it is moved into `x-api-key` (keys start
-- with "fpk_") or `authorization: Bearer` and removed from the path, so it
-- never reaches the access log, the transcoder or the server as a query.

local function unescape(value)
  value = string.gsub(value, "+", " ")
  return (string.gsub(value, "%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

local function take_access_token(headers)
  local path = headers:get(":path") or ""
  local question = string.find(path, "?", 1, true)
  if question == nil or headers:get(":method") ~= "GET" then
    return
  end
  local kept, token = {}, nil
  for pair in string.gmatch(string.sub(path, question + 1), "[^&]+") do
    local name, value = string.match(pair, "^([^=]*)=?(.*)$")
    if name == "access_token" then
      token = unescape(value)
    else
      table.insert(kept, pair)
    end
  end
  if token == nil then
    return
  end
  local base = string.sub(path, 1, question - 1)
  headers:replace(":path", #kept > 0 and (base .. "?" .. table.concat(kept, "&")) or base)
  if string.sub(token, 1, 4) == "fpk_" then
    headers:replace("x-api-key", token)
  else
    headers:replace("authorization", "Bearer " .. token)
  end
end

-- The JSON printer writes fields in field-number order, so an event's id
-- (field 1) leads it: {"id":…} for an Event, {"event":{"id":…}} for a watch.
local ID_PATTERNS = { '^data: {"id":"(%d+)"', '^data: {"event":{"id":"(%d+)"' }
local HEARTBEATS = { 'data: {"id":"","type":"heartbeat"', 'data: {"event":{"id":"","type":"heartbeat"' }

-- One event's text (from its `data:`) with the lines it needs in front.
local function annotate(event)
  for _, pattern in ipairs(ID_PATTERNS) do
    local id = string.match(event, pattern)
    if id ~= nil then
      return "id: " .. id .. "\n" .. event
    end
  end
  for _, prefix in ipairs(HEARTBEATS) do
    if string.sub(event, 1, #prefix) == prefix then
      return "event: heartbeat\n" .. event
    end
  end
  return event
end

-- Rewrites the stream chunk by chunk, holding nothing back. The transcoder
-- writes whole messages per chunk; should an event still be split, its
-- first part is annotated when it holds the start of the JSON.
local function annotate_events(response_handle)
  local at_start = true -- the next byte begins an event
  local half_end = false -- the last chunk ended with the first "\n" of an event's end
  for chunk in response_handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 then
      local text = chunk:getBytes(0, size)
      local out, position = {}, 1
      if half_end and string.sub(text, 1, 1) == "\n" then
        out[1], position, at_start = "\n", 2, true
      end
      while position <= #text do
        local stop = string.find(text, "\n\n", position, true)
        local piece = string.sub(text, position, stop and stop + 1 or #text)
        out[#out + 1] = at_start and annotate(piece) or piece
        at_start = stop ~= nil
        position = stop and stop + 2 or #text + 1
      end
      half_end = not at_start and string.sub(text, -1) == "\n"
      chunk:setBytes(table.concat(out))
    end
  end
end

-- What Envoy serves as gRPC (Grpc::Common::hasGrpcContentType: exactly application/grpc, or
-- application/grpc+...) or grpc-web (its filter's four content types, exactly); anything else,
-- application/grpc;charset=utf-8 or application/grpcx included, is transcoded as REST.
local GRPC_WEB = {
  ["application/grpc-web"] = true, ["application/grpc-web+proto"] = true,
  ["application/grpc-web-text"] = true, ["application/grpc-web-text+proto"] = true,
}
local function is_grpc(content_type)
  return content_type == "application/grpc" or string.sub(content_type, 1, 17) == "application/grpc+"
    or GRPC_WEB[content_type] == true
end

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  -- The access log's method and path: set by the transcoder alone, never taken from a client.
  headers:remove("x-envoy-original-method")
  headers:remove("x-envoy-original-path")
  local content_type = headers:get("content-type") or ""
  if not is_grpc(content_type) then
    request_handle:streamInfo():dynamicMetadata():set("flowport", "rest", true)
    take_access_token(headers)
  end
end

function envoy_on_response(response_handle)
  local mark = response_handle:streamInfo():dynamicMetadata():get("flowport")
  if mark ~= nil and mark["rest"] then
    local headers = response_handle:headers()
    headers:remove("grpc-status")
    headers:remove("grpc-message")
    headers:remove("grpc-accept-encoding")
    headers:remove("grpc-encoding")
    local content_type = headers:get("content-type") or ""
    if string.find(content_type, "text/event-stream", 1, true) == 1 then
      annotate_events(response_handle)
    end
  end
end
