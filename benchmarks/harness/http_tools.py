"""Wrappers for the C load generators from Debian: `wrk` (HTTP/1.1) and `h2load` (HTTP/2: h2c REST and gRPC).

Both run as the measured client, so the client's own cost stays low next to
a Python one. Results come back as LoadResult: wrk's through the JSON its
Lua script (wrk.lua) prints, h2load's from its per-request log file.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.harness.latency import LoadResult

LUA = Path(__file__).with_name("wrk.lua")
# Each wrk run numbers its bodies from its own base: a server that answers a
# body it saw before from a cache (Kailash's durability layer does) must not
# get a repeat from an earlier run. 10^9 per run; the integers stay below
# 2^53, exact as JSON numbers and protobuf doubles.
_WRK_RUNS = itertools.count(1)


class ToolMissing(RuntimeError):
    """wrk or h2load is not installed."""


def _need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        package = {"h2load": "nghttp2-client", "wrk": "wrk"}[tool]
        raise ToolMissing(f"{tool} is not installed: apt-get install {package}")
    return found


def wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    threads: int = 2,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: str = "",
    expect: str = "",
    timeout: float = 30.0,
) -> LoadResult:
    """HTTP/1.1 closed loop over `connections` for `duration` seconds.

    `body`: a template with "%d" for a unique integer per request; `expect`: a
    Lua pattern capturing that integer + 1 in each answer (see wrk.lua).
    """
    env = {
        **os.environ,
        "BENCH_METHOD": method,
        "BENCH_PATH": "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/",
        "BENCH_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items()),
        "BENCH_BODY": body,
        "BENCH_EXPECT": expect,
        "BENCH_BASE": str(next(_WRK_RUNS) * 1_000_000_000),
    }
    command = [
        _need("wrk"),
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout:g}s",
        "-s",
        str(LUA),
        url,
    ]
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=duration + timeout + 30, check=False
    )
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    return LoadResult(
        "wrk (HTTP/1.1)",
        data["requests"],
        data["seconds"],
        data["errors"],
        data["incorrect"],
        connections,
        data["p50"],
        data["p90"],
        data["p99"],
        data["max"],
        [tuple(point) for point in data["cdf"]],
    )


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed), the body of a unary call."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def h2load(
    url: str,
    *,
    requests: int,
    clients: int,
    streams: int = 1,
    threads: int = 1,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> LoadResult:
    """HTTP/2 over cleartext: `clients` connections with `streams` calls in flight on each.

    With `body` it POSTs it (a gRPC call when the headers say application/grpc).
    A gRPC error still answers HTTP 200 (the status is in the trailers), so a
    gRPC scenario checks the server's own error count around the run.
    """
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.tsv"
        command = [
            _need("h2load"),
            f"-n{requests}",
            f"-c{clients}",
            f"-m{streams}",
            f"-t{threads}",
            f"--log-file={log}",
        ]
        for name, value in (headers or {}).items():
            command += ["-H", f"{name}: {value}"]
        if body is not None:
            data = Path(tmp) / "body"
            data.write_bytes(body)
            command += ["-d", str(data)]
        done = subprocess.run([*command, url], capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        latencies: list[float] = []
        errors = 0
        for row in log.read_text().splitlines():
            _, status, micros = row.split("\t")[:3]
            if not 200 <= int(status) <= 299:
                errors += 1
                continue
            latencies.append(int(micros) / 1000)
    return LoadResult.from_latencies(
        f"h2load (HTTP/2, {clients}x{streams})",
        latencies,
        _finished_seconds(done.stdout),
        # h2load's own count covers requests that never got an answer too.
        errors=max(errors, _count(done.stdout, "failed")),
        incorrect=0,
        concurrency=clients * streams,
    )


def _finished_seconds(output: str) -> float:
    """From h2load's "finished in 2.08s, …" (or "…ms")."""
    for line in output.splitlines():
        if line.startswith("finished in "):
            value = line.split()[2].rstrip(",")
            for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
                if value.endswith(unit):
                    return float(value.removesuffix(unit)) * scale
    raise RuntimeError(f"h2load printed no duration:\n{output}")


def _count(output: str, name: str) -> int:
    """A figure of h2load's "requests: 10 total, 10 started, …, 0 failed, …" line."""
    for line in output.splitlines():
        if line.startswith("requests:"):
            for part in line.removeprefix("requests:").split(","):
                count, _, label = part.strip().partition(" ")
                if label == name:
                    return int(count)
    return 0
