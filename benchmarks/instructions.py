"""Instructions the server process runs per trivial execution (or per unary call), counted by valgrind.

CPU time on a shared machine moves by 20-30% from hour to hour; instruction
counts do not. This runs `flowport serve` under `valgrind --tool=cachegrind`
(the server process only: its sandbox workers run natively) twice, driven by
the client of `benchmarks/cpu_per_execution.py`: once with --count
executions and once with --short, and reports the difference per
execution, so start-up and shut-down cancel out.

    python -m benchmarks.instructions --count 1100 --short 100
    python -m benchmarks.instructions --baseline      # GetInfo calls instead

Two runs of the same code agree to about 1-3%: how many executions share a
write batch depends on timing, and timing under valgrind varies. Read a
difference below about 3% as none. Needs the `valgrind` package.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from benchmarks.cpu_per_execution import ADMIN_KEY, _drive, server_settings
from flowport.server.supervisor import child_environment
from flowport.v1 import gateway_pb2, gateway_pb2_grpc

_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


async def _until_ready(target: str, seconds: float = 300.0) -> None:
    """Wait for the server (slow to start under valgrind) to answer."""
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        while True:
            try:
                await gateway_pb2_grpc.GatewayServiceStub(channel).GetInfo(
                    gateway_pb2.GetInfoRequest(), timeout=2, metadata=(("x-api-key", ADMIN_KEY),)
                )
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)


def _instructions(count: int, baseline: bool, work: Path) -> int:
    """Instructions the server process ran over its whole life, serving `count` calls (+ warm-up)."""
    with tempfile.TemporaryDirectory(dir=work) as data:
        settings = server_settings(data)
        command = ["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={work}/cachegrind.out"]
        server = subprocess.Popen(
            [*command, sys.executable, "-m", "flowport.clients.cli", "serve", "--log-level", "warning"],
            env=child_environment(settings),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            asyncio.run(_until_ready(settings.grpc_target))
            asyncio.run(_drive(settings.grpc_target, count, 16, baseline))
        finally:
            server.terminate()
            _, report = server.communicate(timeout=600)
    found = _REFS.search(report)
    if found is None:
        raise SystemExit(f"valgrind printed no instruction count:\n{report[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1100)
    parser.add_argument("--short", type=int, default=100, help="the shorter run, subtracted")
    parser.add_argument("--baseline", action="store_true", help="trivial unary calls (GetInfo) instead")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    if args.count <= args.short:
        parser.error("--count must be larger than --short")
    with tempfile.TemporaryDirectory() as work:
        short = _instructions(args.short, args.baseline, Path(work))
        long = _instructions(args.count, args.baseline, Path(work))
    what = "GetInfo call" if args.baseline else "execution"
    print(f"server instructions: {short:,} for {args.short}, {long:,} for {args.count} (+50 warm-up each)")
    print(f"server instructions per {what}: {(long - short) / (args.count - args.short):,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
