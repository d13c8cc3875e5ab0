"""The processes under test: `flowport up`, a bare grpc.aio server, the Kailash gateway.

Each runs as its own process on loopback ports chosen free, and knows which
pids to measure: a benchmark reads their CPU and memory from /proc.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.harness import procstat
from flowport.server.settings import Settings
from flowport.server.supervisor import child_environment

ADMIN_KEY = "fpk_bench." + secrets.token_urlsafe(32)
HERE = Path(__file__).resolve().parent.parent


class TargetFailed(RuntimeError):
    """A process under test did not start."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, deadline: float, process: subprocess.Popen[Any] | None = None) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        if process is not None and process.poll() is not None:
            raise TargetFailed(f"it exited with code {process.returncode} before {url} answered")
        time.sleep(0.02)
    raise TargetFailed(f"{url} did not answer 200 in time")


def _wait_grpc_serving(target: str, deadline: float) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.02)
    raise TargetFailed(f"{target} did not report SERVING in time")


def _stop(process: subprocess.Popen[Any], timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class FlowportUp:
    """`flowport up`: the supervisor, its server processes (with their sandbox workers) and Envoy."""

    settings: Settings
    process: subprocess.Popen[bytes]
    # Seconds from launching `flowport up` to health answering through Envoy.
    startup_seconds: float

    @property
    def grpc_direct(self) -> str:
        """A server's own port (no Envoy)."""
        return f"127.0.0.1:{self.settings.grpc_port}"

    @property
    def edge(self) -> str:
        """Envoy's port: REST, and native gRPC through Envoy."""
        return f"127.0.0.1:{self.settings.http_port}"

    def server_pids(self) -> list[int]:
        """The server processes (their sandbox workers are their descendants)."""
        return [
            p
            for p in procstat.children(self.process.pid)
            if procstat.command(p) not in ("envoy", "") and _parent(p) == self.process.pid
        ]

    def envoy_pids(self) -> list[int]:
        return [p for p in procstat.children(self.process.pid) if procstat.command(p) == "envoy"]

    def stop(self) -> None:
        _stop(self.process)

    @classmethod
    @contextlib.contextmanager
    def run(cls, data_dir: Path, **overrides: Any) -> Iterator[FlowportUp]:
        values: dict[str, Any] = {
            "data_dir": data_dir,
            "http_port": free_port(),
            "grpc_port": free_port(),
            "admin_port": free_port(),
            "metrics_port": free_port(),
            # The /ws bridge as a default start has it, on a port no other run holds.
            "websocket_port": free_port(),
            "admin_api_key": ADMIN_KEY,
            "log_level": "warning",
            "access_log": "off",
            # Measured: the servers and Envoy, not Envoy's local request limits.
            "rate_limit_max_requests": 0,
            # One tenant drives the load: the caps that keep tenants apart would only idle capacity.
            "tenant_execution_share": 1.0,
            "tenant_sandbox_share": 1.0,
            # The webhook scenario's receiver listens on loopback.
            "webhook_allowlist": "127.0.0.1",
        }
        values.update(overrides)
        settings = Settings.load(values, environ={})
        # Output to a file: a pipe nobody reads during a long run would fill and stall the process.
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / "up.log"
        started = time.monotonic()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "flowport.clients.cli", "up"],
                env=child_environment(settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = started + 90
            _wait_http(f"http://127.0.0.1:{settings.http_port}/health", deadline, process)
            up = cls(settings, process, time.monotonic() - started)
            _wait_grpc_serving(up.grpc_direct, deadline)
            yield up
        except TargetFailed as exc:
            if process.poll() is None:
                process.kill()
                process.wait()
            output = log_path.read_text(errors="replace")
            raise TargetFailed(f"flowport up did not start: {exc}\n{output[-2000:]}") from exc
        finally:
            _stop(process)


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class EchoServer:
    """A bare grpc.aio server on uvloop answering GetSession with a fixed message: the limit of
    Python gRPC on this machine, with nothing of flowport in the call."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    @contextlib.contextmanager
    def run(cls, reply: bytes) -> Iterator[EchoServer]:
        """`reply`: the serialized Session it returns (the same size flowport's answer has)."""
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.harness.echo_server", str(port), reply.hex()],
            cwd=HERE.parent,
        )
        try:
            _wait_grpc_serving(f"127.0.0.1:{port}", time.monotonic() + 30)
            yield cls(port, process)
        finally:
            _stop(process)


@dataclass
class KailashGateway:
    """Kailash's enterprise gateway (`create_gateway(server_type="enterprise")`) with the trivial workflow."""

    port: int
    process: subprocess.Popen[bytes]
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    @contextlib.contextmanager
    def run(cls, python: Path) -> Iterator[KailashGateway]:
        """`python`: the interpreter of the Kailash virtual environment (benchmarks/harness/kailash_venv.py)."""
        port = free_port()
        api_key = secrets.token_urlsafe(24)
        env = {**os.environ, "KAILASH_API_KEY_BENCH": api_key}
        env.pop("PYTHONPATH", None)  # nothing of flowport's environment leaks into Kailash's
        # Its output to a file: a pipe nobody reads during the run would fill and stall it.
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                [str(python), str(HERE / "peers" / "kailash_gateway.py"), "--port", str(port)],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_http(f"http://127.0.0.1:{port}/health", time.monotonic() + 90, process)
            except TargetFailed as exc:
                _stop(process)
                output.seek(0)
                error = output.read().decode(errors="replace")[-2000:]
                raise TargetFailed(f"the Kailash gateway did not start: {exc}\n{error}") from exc
            try:
                yield cls(port, process, api_key)
            finally:
                _stop(process)
