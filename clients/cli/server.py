"""`flowport up`, `serve` and `envoy-config`: the commands that run (or describe) a server."""

from __future__ import annotations

import json
import logging
import sys

from flowport.server.settings import Settings


def serve(settings: Settings) -> int:
    """`flowport serve`, holding the data dir (server/datadir.py) for as long as it runs."""
    from flowport.server.datadir import DataDirError, open_data_dir

    try:
        data_dir = open_data_dir(settings.data_dir, "flowport serve")
    except DataDirError as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return 2
    for warning in data_dir.warnings:
        logging.getLogger("flowport.server").warning("%s", warning)
    # Imported once the data dir is this process's: a refusal prints its one line and nothing else.
    from flowport.server.app import run

    try:
        return run(settings)
    finally:
        data_dir.close()


def up(settings: Settings) -> int:
    """`flowport up`: servers and Envoy until Ctrl-C, each line of progress printed as it happens."""
    from flowport.server.supervisor import up as supervise

    return supervise(settings, out=lambda line: print(line, flush=True))


def envoy_config(settings: Settings) -> int:
    """`flowport envoy-config`: the Envoy bootstrap `up` would render, as JSON."""
    from flowport.transcoder.envoy_config import render

    print(json.dumps(render(settings), indent=2))
    return 0
