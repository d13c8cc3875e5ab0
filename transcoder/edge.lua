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
--
-- Nor can a browser WebSocket, and the seed's code sends no token at all: a
-- GET of /events or /ws without a credential header or `?access_token=`
-- takes the `flowport_token` cookie (the same values) into those headers,
-- and removes it from the Cookie header sent on (a cookie comes with every
-- request of a page's origin, so one the request names itself wins over it).
-- Query tokens and cookies are added beside the headers a request has,
-- never in their place: a call carries one credential, and the server
-- refuses one that arrives with two (a header and a query parameter, two
-- query parameters, two cookies), rather than one silently winning.
--
-- A browser sends cookies whichever page opened the
-- connection, and WebSockets have no CORS: so such a request, when it has
-- an Origin, must come from this host (Origin's host and port equal to the
-- request's) or one of --cors-origins ('*' does not count), else it is a
-- 403 here (cross-site WebSocket hijacking). COOKIE_ORIGINS, the configured
-- origins, is written in front of this code by transcoder/edge_filter.py.
--
-- x-flowport-transport marks the WebSocket bridge's own calls to the server
-- (its stats count them as websocket streams): never taken from a client.

local function unescape(value)
  value = string.gsub(value, "+", " ")
  return (string.gsub(value, "%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- A credential is added beside any the request already has, never put in
-- place of one: a request with two (a header and ?access_token=, two
-- cookies, ...) reaches the server with both, which refuses it (401).
local function add_credential(headers, token)
  if string.sub(token, 1, 4) == "fpk_" then
    headers:add("x-api-key", token)
  else
    headers:add("authorization", "Bearer " .. token)
  end
end

-- Every ?access_token= of a GET is taken out of the path and added as a credential
-- (an empty one is only taken out).
local function take_access_token(headers)
  local path = headers:get(":path") or ""
  local question = string.find(path, "?", 1, true)
  if question == nil or headers:get(":method") ~= "GET" then
    return
  end
  local kept, tokens, found = {}, {}, false
  for pair in string.gmatch(string.sub(path, question + 1), "[^&]+") do
    local name, value = string.match(pair, "^([^=]*)=?(.*)$")
    if name == "access_token" then
      found = true
      if value ~= "" then
        tokens[#tokens + 1] = unescape(value)
      end
    else
      table.insert(kept, pair)
    end
  end
  if not found then
    return
  end
  local base = string.sub(path, 1, question - 1)
  headers:replace(":path", #kept > 0 and (base .. "?" .. table.concat(kept, "&")) or base)
  for _, token in ipairs(tokens) do
    add_credential(headers, token)
  end
end

local TOKEN_COOKIE = "flowport_token"
local COOKIE_PATHS = { ["/events"] = true, ["/ws"] = true }
local DEFAULT_PORTS = { http = ":80", https = ":443", ws = ":80", wss = ":443" }

-- `text` without the white space at its ends, found from each end ("^%s*(.-)%s*$" tried the rest
-- again at each character of a long run of spaces inside it: seconds for a 30 KB cookie).
local function trim(text)
  local first = string.find(text, "%S")
  if first == nil then
    return ""
  end
  local last = #text
  while string.find(string.sub(text, last, last), "%s") do
    last = last - 1
  end
  return string.sub(text, first, last)
end

-- The flowport_token cookies' values (empty ones left out), removed from the Cookie header(s).
local function take_cookies(headers)
  local count = headers:getNumValues("cookie")
  local tokens, kept, found = {}, {}, false
  for i = 0, count - 1 do
    for pair in string.gmatch(headers:getAtIndex("cookie", i) or "", "[^;]+") do
      local equals = string.find(pair, "=", 1, true)
      local name = equals and trim(string.sub(pair, 1, equals - 1))
      local value = equals and trim(string.sub(pair, equals + 1)) or ""
      if name == TOKEN_COOKIE then
        found = true
        local token = string.match(value, '^"(.*)"$') or value
        if token ~= "" then
          tokens[#tokens + 1] = token
        end
      elseif string.find(pair, "%S") then
        kept[#kept + 1] = trim(pair)
      end
    end
  end
  if found then
    headers:remove("cookie")
    if #kept > 0 then
      headers:add("cookie", table.concat(kept, "; "))
    end
  end
  return tokens
end

-- Whether a browser's Origin is this host (scheme://host[:port] against the request's authority).
local function same_host(origin, authority)
  local scheme, rest = string.match(string.lower(origin), "^(%a[%w+.-]*)://([^/]+)$")
  if scheme == nil or authority == nil then
    return false
  end
  authority = string.lower(authority)
  local default = DEFAULT_PORTS[scheme]
  if default ~= nil then
    if string.sub(rest, -#default) == default then
      rest = string.sub(rest, 1, -#default - 1)
    end
    if string.sub(authority, -#default) == default then
      authority = string.sub(authority, 1, -#default - 1)
    end
  end
  return rest == authority
end

-- The cookie credentials of a stream GET, added to its headers; false when the request is refused.
local function take_cookie_credential(request_handle, headers)
  local path = headers:get(":path") or ""
  if headers:get(":method") ~= "GET" or not COOKIE_PATHS[string.match(path, "^[^?]*")] then
    return true
  end
  local tokens = take_cookies(headers)
  -- A browser sends the cookie with every request of its origin, whatever the page meant: a
  -- credential the request names itself (a header, ?access_token=) is the one it means, and
  -- the cookie is left out. Two cookies, or a cookie alone, are the request's own.
  if #tokens == 0 or headers:get("x-api-key") ~= nil or headers:get("authorization") ~= nil then
    return true
  end
  local origin = headers:get("origin")
  if origin ~= nil and not COOKIE_ORIGINS[origin] and not same_host(origin, headers:get(":authority")) then
    request_handle:streamInfo():dynamicMetadata():set("flowport", "json_reply", true)
    request_handle:streamInfo():dynamicMetadata():set("flowport", "grpc_status", 7)
    request_handle:respond({ [":status"] = "403", ["content-type"] = "application/json" },
      '{"code":7,"message":"the flowport_token cookie is accepted from this host\'s pages and --cors-origins only",'
      .. '"details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"CROSS_ORIGIN_COOKIE",'
      .. '"domain":"flowport.dev"}]}')
    return false
  end
  for _, token in ipairs(tokens) do
    add_credential(headers, token)
  end
  return true
end

-- The JSON printer writes fields in field-number order, so an event's id
-- (field 1) leads it: {"id":…} for an Event, {"event":{"id":…}} for a watch.
local ID_PATTERNS = { '^data: {"id":"(%d+)"', '^data: {"event":{"id":"(%d+)"' }
-- A heartbeat has no id, except the last one of a stream a stopping server
-- ends: it carries the stream's cursor, for the client to resume from.
local HEARTBEATS = { '^data: {"id":"%d*","type":"heartbeat"', '^data: {"event":{"id":"%d*","type":"heartbeat"' }

-- One event's text (from its `data:`) with the lines it needs in front.
local function annotate(event)
  local lines = ""
  for _, pattern in ipairs(ID_PATTERNS) do
    local id = string.match(event, pattern)
    if id ~= nil then
      lines = "id: " .. id .. "\n"
      break
    end
  end
  for _, pattern in ipairs(HEARTBEATS) do
    if string.find(event, pattern) then
      return lines .. "event: heartbeat\n" .. event
    end
  end
  return lines .. event
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
  headers:remove("x-flowport-transport")
  local content_type = headers:get("content-type") or ""
  if not is_grpc(content_type) then
    request_handle:streamInfo():dynamicMetadata():set("flowport", "rest", true)
    take_access_token(headers)
    take_cookie_credential(request_handle, headers)
  end
end

-- The gRPC status a REST answer stands for, for the access log (its grpc_status): Envoy's
-- own %GRPC_STATUS% maps the HTTP status back to a code, and 404 is not UNIMPLEMENTED, nor
-- 409 UNKNOWN. An error's JSON google.rpc.Status (the server's, converted by the
-- transcoder, or Envoy's own reply) leads with its code; an answer the server sent
-- (x-envoy-upstream-service-time) that is not an error is OK. Nothing for anything else
-- (the OpenAPI document, a WebSocket's upgrade): no gRPC call was made.
local function record_status(response_handle, status, from_server)
  local code = nil
  if status < 400 then
    code = (status < 300 and from_server) and 0 or nil
  else
    local body = response_handle:body()
    if body ~= nil and body:length() > 0 then
      code = tonumber(string.match(body:getBytes(0, math.min(body:length(), 64)), '^%s*{%s*"code"%s*:%s*(%d+)'))
    end
  end
  if code ~= nil then
    -- Fetched here: no handle taken before body() may be used after it.
    response_handle:streamInfo():dynamicMetadata():set("flowport", "grpc_status", code)
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
    local status = tonumber(headers:get(":status") or "") or 0
    local from_server = headers:get("x-envoy-upstream-service-time") ~= nil
    -- The headers are done with: reading an error's body ends what may be done with them.
    record_status(response_handle, status, from_server)
    if status < 400 and string.find(content_type, "text/event-stream", 1, true) == 1 then
      annotate_events(response_handle)
    end
  end
end
