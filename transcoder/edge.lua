-- flowport's edge filter, first in Envoy's HTTP filter chain.
--
-- Marks REST requests (anything not gRPC or grpc-web) in dynamic metadata,
-- before the transcoder rewrites them into gRPC: local replies use the mark
-- to answer REST callers with JSON, and responses to REST callers lose the
-- grpc-* headers the transcoder leaves on them.

function envoy_on_request(request_handle)
  local content_type = request_handle:headers():get("content-type") or ""
  if string.find(content_type, "application/grpc", 1, true) ~= 1 then
    request_handle:streamInfo():dynamicMetadata():set("flowport", "rest", true)
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
