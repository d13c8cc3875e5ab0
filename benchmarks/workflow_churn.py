"""What one tenant changing its workflows in a loop costs another tenant's workflow reads, on
PostgreSQL, where each process keeps workflows in memory (server/storage/workflow_cache.py).

Two stores on one database stand for two server processes. Through the first, a `quiet` tenant
reads its workflows round-robin, as executions do when they start; through the second, a `busy`
tenant creates and deletes a workflow in a loop (or does nothing, for the baseline). Both phases
run in the same run, on a PostgreSQL server started here (tests/backends.py):

    python -m benchmarks.workflow_churn --seconds 8 --workflows 200

Reported per phase: the quiet tenant's reads/s and CPU per read (this process), how many of its
reads missed what the process keeps (each a round trip to PostgreSQL), and the busy tenant's
changes/s.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from google.protobuf import timestamp_pb2

from flowport.server.storage.postgres import PostgresStore
from flowport.v1 import workflow_pb2
from tests.backends import PostgresServer

NOW_US = 1_700_000_000_000_000


def _workflow(n: int) -> workflow_pb2.Workflow:
    return workflow_pb2.Workflow(
        workflow_id=f"w{n}", description="d" * 400, create_time=timestamp_pb2.Timestamp(seconds=NOW_US // 10**6)
    )


async def _phase(url: str, *, churn: bool, seconds: float, workflows: int) -> str:
    reader = await PostgresStore.open(url)
    editor = await PostgresStore.open(url)
    try:
        for n in range(workflows):
            await reader.get_workflow("quiet", f"w{n}")  # kept before the clock starts
        stop = asyncio.Event()
        changes = 0

        async def busy() -> None:
            nonlocal changes
            while not stop.is_set():
                await editor.create_workflow("busy", _workflow(0), None)
                await editor.delete_workflow("busy", "w0", NOW_US)
                changes += 2

        task = asyncio.create_task(busy()) if churn else None
        cache = reader._workflow_cache
        assert cache is not None, "a PostgreSQL store keeps workflows"
        misses = cache.misses
        reads = 0
        started, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            found = await reader.get_workflow("quiet", f"w{reads % workflows}")
            if found is None:
                raise SystemExit(f"quiet workflow w{reads % workflows} went missing")
            reads += 1
            await asyncio.sleep(0)  # a read served from memory never yields; executions do
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        stop.set()
        if task is not None:
            await task
        return (
            f"{'busy tenant churning' if churn else 'busy tenant idle':>22}: quiet reads {reads / elapsed:9.0f}/s,"
            f" {1e6 * cpu / reads:6.1f} µs CPU per read (both stores), {cache.misses - misses} misses,"
            f" busy changes {changes / elapsed:5.1f}/s"
        )
    finally:
        await reader.close()
        await editor.close()


async def _main(seconds: float, workflows: int) -> None:
    with PostgresServer() as server:
        for churn in (False, True):
            url = server.new_database()
            editor = await PostgresStore.open(url)
            try:
                for n in range(workflows):
                    await editor.create_workflow("quiet", _workflow(n), None)
            finally:
                await editor.close()
            print(await _phase(url, churn=churn, seconds=seconds, workflows=workflows), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workflows", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(_main(args.seconds, args.workflows))


if __name__ == "__main__":
    main()
