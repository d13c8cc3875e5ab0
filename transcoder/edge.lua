-- flowport's edge filter, first in Envoy's HTTP filter chain.
--
-- Marks REST requests (anything not gRPC or grpc-web) in dynamic metadata,
-- before the transcoder rewrites them into gRPC: local replies use the mark
-- to answer REST callers with JSON, and responses to REST callers lose the
-- grpc-* headers the transcoder leaves on them.
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

function envoy_on_request(request_handle)
  local headers = request_handle:headers()
  local content_type = headers:get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) ~= 1 then
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
  end
end
