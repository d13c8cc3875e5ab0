"""The Kailash enterprise gateway serving the trivial workflow, for the comparison.

Runs inside the Kailash virtual environment the harness makes
(benchmarks/peers/kailash_venv.py), never in flowport's: it imports only
Kailash. Usage:

    <venv>/bin/python kailash_gateway.py --port 8123

API key: the KAILASH_API_KEY_BENCH environment variable (sent as X-API-Key),
so Kailash authenticates every request as flowport does.
"""

from __future__ import annotations

import argparse

import uvicorn
from kailash.servers.gateway import create_gateway
from kailash.workflow.builder import WorkflowBuilder


def trivial_workflow():  # type: ignore[no-untyped-def]
    """One PythonCodeNode returning a small dict from an input `n`, as flowport's trivial workflow."""
    builder = WorkflowBuilder()
    builder.add_node("PythonCodeNode", "calc", {"code": "result = {'n': n + 1}"})
    return builder.build()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    gateway = create_gateway(title="bench", server_type="enterprise", cors_origins=[])
    gateway.register_workflow("trivial", trivial_workflow())
    uvicorn.run(gateway.app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
