"""flowport's gRPC server: one asyncio process serving every gateway service.

`app.start(settings)` builds a running server from the one typed `Settings`
object (`settings.py`); `supervisor.py` is `flowport up`, which runs it (or
several) behind Envoy. Services live in `api/`, the workflow engine in
`engine/`, node types in `nodes/`, durable state in `storage/`, the event bus
and log in `events/`; every error a service raises on purpose is a
`errors.FlowportError`, mapped once to `google.rpc.Status` by `interceptor.py`.
"""
