"""Services that are in the API but not served yet answer UNIMPLEMENTED.

The handlers are built from the descriptors, so every RPC of such a
service, including ones added later to its .proto, answers with a message
that names it rather than gRPC's bare "Method not found!".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from flowport.server.errors import Unimplemented
from flowport.server.version import VERSION


def _error(method: MethodDescriptor) -> Unimplemented:
    return Unimplemented(
        f"{method.full_name} is part of the flowport.v1 API but not implemented in flowport {VERSION} yet",
        reason="NOT_IMPLEMENTED_YET",
        metadata={"method": method.full_name},
    )


def _handler(method: MethodDescriptor) -> grpc.RpcMethodHandler[Any, Any]:
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    kwargs: dict[str, Any] = {
        "request_deserializer": request_class.FromString,
        "response_serializer": response_class.SerializeToString,
    }
    if method.server_streaming:

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            raise _error(method)
            yield  # makes this an async generator, like every stream handler

        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)

    async def unary(request: Any, context: Any) -> NoReturn:
        raise _error(method)

    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


def unimplemented_handler(service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """A handler answering UNIMPLEMENTED, with a clear message, for every RPC of `service`."""
    return grpc.method_handlers_generic_handler(service.full_name, {m.name: _handler(m) for m in service.methods})
