"""A bare grpc.aio server on uvloop: SessionService.GetSession answers one fixed message.

    python -m benchmarks.harness.echo_server PORT REPLY_HEX

The baseline for flowport's unary calls: the same message size over the
same stack, with no authentication, storage or anything else of flowport.
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health, health_pb2_grpc

from flowport.v1 import session_pb2, session_pb2_grpc


class Echo(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, reply: session_pb2.Session) -> None:
        self.reply = reply

    async def GetSession(self, request: session_pb2.GetSessionRequest, context: Any) -> session_pb2.Session:
        return self.reply


async def serve(port: int, reply: session_pb2.Session) -> None:
    server = grpc.aio.server()
    session_pb2_grpc.add_SessionServiceServicer_to_server(Echo(reply), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    port, reply_hex = int(sys.argv[1]), sys.argv[2]
    uvloop.run(serve(port, session_pb2.Session.FromString(bytes.fromhex(reply_hex))))


if __name__ == "__main__":
    main()
