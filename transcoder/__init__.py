"""Everything that turns the Protobuf API into HTTP.

`codegen` builds the Python stubs, the descriptor set Envoy's gRPC-JSON
transcoder reads and the OpenAPI document from `proto/`; `http_rules` reads
each RPC's `google.api.http` bindings; `envoy_config` (with `envoy_routes`,
`local_replies`, `console_routes` and the `edge.lua` filter) renders the Envoy
configuration `flowport up` runs.
"""
