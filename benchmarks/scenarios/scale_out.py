"""Scale-out: unary calls and executions per second with `--workers 1` and `2`, on SQLite
and on PostgreSQL + Redis (started here from Debian's packages, as the tests do).

The measurement itself is benchmarks/scale_out.py's; the machine's core
count goes beside every figure, since the load generator, Envoy, the
servers, PostgreSQL and Redis share those cores.
"""

from __future__ import annotations

import argparse
import os

from benchmarks import scale_out
from benchmarks.scenarios import Context, Result, check
from tests.backends import PostgresServer, RedisServer


def run(ctx: Context) -> Result:
    seconds = ctx.sizes.scale_out_seconds
    args = argparse.Namespace(duration=seconds, warmup=min(2.0, seconds), concurrency=32)
    rows = []
    with PostgresServer() as postgres, RedisServer() as redis:
        configs = [
            {"name": "sqlite, 1 worker", "settings": {}},
            {
                "name": "pg+redis, 1 worker",
                "settings": {"database_url": postgres.new_database(), "redis_url": redis.url},
            },
            {
                "name": "pg+redis, 2 workers",
                "settings": {"database_url": postgres.new_database(), "redis_url": redis.url, "workers": 2},
            },
        ]
        for config in configs:
            for scenario in ("unary", "executions"):
                rows.append(
                    {**scale_out.run_one(config, scenario, args, ctx.folder("scale-out")), "cores": os.cpu_count()}
                )
    checks = [
        check(
            all(row["errors"] == 0 and row["per_second"] > 0 for row in rows), "every configuration answered, no errors"
        )
    ]
    return {"rows": rows, "checks": checks}
