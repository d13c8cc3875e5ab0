"""Compressed bodies from tenant-given endpoints never expand in memory past what the gateway
reads: HTTP nodes decode gzip and deflate a step at a time against `max_response_bytes`, and a
registered service's health check never reads the body at all.

Memory is measured with tracemalloc around the one call (the bombs are built before it starts):
httpx's own decoding turns one 64 KiB chunk of compressed zeros into ~64 MiB at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from flowport.server.nodes.base import NodeError
from flowport.server.nodes.http import MAX_RESPONSE_BYTES
from flowport.server.service_checks import HEALTHY, probe
from flowport.v1 import registry_pb2

from .test_http_nodes import make_ctx
from .test_http_nodes import run_http as run_node

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
LOOPBACK = frozenset({"127.0.0.1"})
BOMB_SIZE = 64 * MiB
# Far below what decoding a bomb's first chunk whole takes (~64 MiB), far above the cap plus a step.
SMALL_CAP = 1 * MiB
SMALL_CAP_PEAK = 8 * MiB
DEFAULT_CAP_PEAK = MAX_RESPONSE_BYTES + 16 * MiB

GZIP, ZLIB, RAW_DEFLATE = 31, 15, -15  # zlib wbits


def packed(data_size: int, wbits: int, chunk: bytes = bytes(MiB)) -> bytes:
    """`data_size` zero bytes (or repeats of `chunk`) compressed, built without holding them all."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    parts = [packer.compress(chunk) for _ in range(data_size // len(chunk))]
    parts.append(packer.flush())
    return b"".join(parts)


def pack(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


# -- a server that answers with whatever bytes it is given ------------------------------------


@dataclass
class Answer:
    headers: dict[str, str]
    body: bytes = b""
    status: int = 200
    # After the body, keep the connection open until the client closes it: a body that never ends.
    endless: bool = False
    requests: int = 0
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def answering(answer: Answer) -> AsyncIterator[str]:
    """An HTTP/1.1 server on 127.0.0.1 sending `answer` to every request; yields its base URL."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_head = await reader.readuntil(b"\r\n\r\n")
            answer.requests += 1
            head = [f"HTTP/1.1 {answer.status} Whatever"]
            head += [f"{name}: {value}" for name, value in answer.headers.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            if not request_head.startswith(b"HEAD "):
                writer.write(answer.body)
            await writer.drain()
            if answer.endless:
                while await reader.read(65536):
                    pass
                answer.closed_by_client.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            answer.closed_by_client.set()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The most Python memory held at once inside the block, beyond what was held before it."""
    peak: list[int] = []
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as shared:
        yield shared


async def run_http(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    return await run_node(make_ctx(client, timeout=60.0, allowlist=LOOPBACK), **params)


# -- HTTP nodes ---------------------------------------------------------------------------------


BOMBS = {
    "gzip": (packed(BOMB_SIZE, GZIP), "gzip"),
    "x-gzip": (packed(BOMB_SIZE, GZIP), "x-gzip"),
    "deflate (zlib)": (packed(BOMB_SIZE, ZLIB), "deflate"),
    "deflate (raw)": (packed(BOMB_SIZE, RAW_DEFLATE), "deflate"),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
@pytest.mark.parametrize(("cap", "most"), [(SMALL_CAP, SMALL_CAP_PEAK), (None, DEFAULT_CAP_PEAK)])
async def test_a_compressed_bomb_stops_at_the_cap_without_expanding(
    client: httpx.AsyncClient, bomb: str, cap: int | None, most: int
) -> None:
    body, coding = BOMBS[bomb]
    assert len(body) < SMALL_CAP, "small enough on the wire for the content-length check to let it in"
    limit = {} if cap is None else {"max_response_bytes": cap}
    answer = Answer({"Content-Encoding": coding, "Content-Length": str(len(body))}, body)
    async with answering(answer) as base:
        with peak_memory() as peak, pytest.raises(NodeError) as caught:
            await run_http(client, url=f"{base}/bomb", **limit)
    assert caught.value.reason == "HTTP_RESPONSE_TOO_LARGE"
    assert f"larger than the {cap or MAX_RESPONSE_BYTES} bytes allowed" in caught.value.message
    assert peak[0] < most, f"{peak[0] / MiB:.1f} MiB held while reading {bomb}"


@pytest.mark.parametrize(
    ("coding", "wbits"),
    [("gzip", GZIP), ("x-gzip", GZIP), ("deflate", ZLIB), ("deflate", RAW_DEFLATE)],
)
async def test_compressed_bodies_within_the_cap_are_decoded(client: httpx.AsyncClient, coding: str, wbits: int) -> None:
    # Larger than a decoding step, so it arrives in several pieces.
    value = {"items": [{"n": n, "text": "ab" * n} for n in range(400)]}
    plain = json.dumps(value).encode()
    body = pack(plain, wbits)
    answer = Answer({"Content-Type": "application/json", "Content-Encoding": coding, "Transfer-Encoding": "chunked"})
    # Chunked framing, one byte first: deflate must tell a zlib header from raw data across chunks.
    answer.body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:1], body[1:])) + b"0\r\n\r\n"
    async with answering(answer) as base:
        out = await run_http(client, url=f"{base}/data", max_response_bytes=len(plain))
    assert out["success"] is True
    assert out["response"]["json"] == value
    assert out["response"]["body"] == plain.decode()


async def test_a_body_one_byte_over_the_cap_decoded_is_refused(client: httpx.AsyncClient) -> None:
    plain = b"x" * 5000
    body = pack(plain, GZIP)
    answer = Answer({"Content-Encoding": "gzip", "Content-Length": str(len(body))}, body)
    async with answering(answer) as base:
        with pytest.raises(NodeError) as caught:
            await run_http(client, url=f"{base}/x", max_response_bytes=len(plain) - 1)
        assert caught.value.reason == "HTTP_RESPONSE_TOO_LARGE"
        out = await run_http(client, url=f"{base}/x", max_response_bytes=len(plain))
    assert out["response"]["body"] == plain.decode()


@pytest.mark.parametrize("coding", ["gzip, gzip", "deflate, gzip", "gzip, gzip, gzip"])
async def test_a_body_compressed_more_than_once_is_refused_before_decoding(
    client: httpx.AsyncClient, coding: str
) -> None:
    """Only the last layer's output counts against the cap: an inner layer's could expand without
    bound (a tiny inner gzip followed by gigabytes of compressed zeros), holding the event loop."""
    body = pack(pack(b"ok", GZIP) + bytes(2**20), GZIP)
    answer = Answer({"Content-Encoding": coding, "Content-Length": str(len(body))}, body)
    async with answering(answer) as base:
        with pytest.raises(NodeError) as caught:
            await run_http(client, url=f"{base}/x")
    assert caught.value.reason == "HTTP_BAD_RESPONSE"
    assert "compressed more than once" in caught.value.message


@pytest.mark.parametrize("coding", ["br", "zstd", "gzip, br"])
async def test_codings_the_node_cannot_decode_in_steps_are_refused(client: httpx.AsyncClient, coding: str) -> None:
    # httpx decodes these whole when brotli or zstandard is installed, and passes them through as
    # noise when not: either way not an answer to hand on.
    answer = Answer({"Content-Encoding": coding, "Content-Length": "16"}, bytes(range(16)))
    async with answering(answer) as base:
        with pytest.raises(NodeError) as caught:
            await run_http(client, url=f"{base}/x")
        assert caught.value.reason == "HTTP_BAD_RESPONSE"
        assert "compressed with " in caught.value.message and "(they decode gzip and deflate)" in caught.value.message
        # No body, nothing to decode: a HEAD answer stands.
        head = await run_http(client, url=f"{base}/x", method="HEAD")
    assert head["success"] is True and head["response"]["body"] == ""


async def test_data_that_is_not_what_its_coding_says_is_a_bad_response(client: httpx.AsyncClient) -> None:
    answer = Answer({"Content-Encoding": "gzip", "Content-Length": "20"}, b"definitely not gzip!")
    async with answering(answer) as base:
        with pytest.raises(NodeError) as caught:
            await run_http(client, url=f"{base}/x")
    assert caught.value.reason == "HTTP_BAD_RESPONSE"
    assert "is not valid gzip data" in caught.value.message


async def test_the_compressed_size_counts_too(client: httpx.AsyncClient) -> None:
    # A small gzip stream, then more bytes than the cap: ignored by the decoder, still downloaded.
    body = pack(b'{"ok": true}', GZIP) + bytes(4096)
    answer = Answer({"Content-Encoding": "gzip", "Transfer-Encoding": "chunked"})
    answer.body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    async with answering(answer) as base:
        with pytest.raises(NodeError) as caught:
            await run_http(client, url=f"{base}/x", max_response_bytes=1000)
    assert caught.value.reason == "HTTP_RESPONSE_TOO_LARGE"


# -- service health checks ---------------------------------------------------------------------


def service(base: str) -> registry_pb2.RegisteredService:
    return registry_pb2.RegisteredService(service_id="svc_1", endpoint=base, health_path="/health")


async def test_a_health_check_never_reads_a_compressed_body(client: httpx.AsyncClient) -> None:
    body = packed(4 * BOMB_SIZE, GZIP)  # 256 MiB decoded, ~256 KB sent
    answer = Answer({"Content-Encoding": "gzip", "Content-Length": str(len(body))}, body)
    async with answering(answer) as base:
        with peak_memory() as peak:
            status = (await probe(client, service(base), LOOPBACK, timeout=30.0)).status
    assert status == HEALTHY
    assert answer.requests == 1
    assert peak[0] < SMALL_CAP_PEAK, f"{peak[0] / MiB:.1f} MiB held by one health check"


async def test_a_health_check_does_not_wait_for_a_body_that_never_ends(client: httpx.AsyncClient) -> None:
    # The status line is the answer; a body that keeps coming (or never comes) is not waited for.
    answer = Answer({"Content-Length": str(MiB)}, b"partial", endless=True)
    async with answering(answer) as base:
        status = (await probe(client, service(base), LOOPBACK, timeout=10.0)).status
        assert status == HEALTHY
        # The connection is dropped, not left to the server to end.
        await asyncio.wait_for(answer.closed_by_client.wait(), 30)
