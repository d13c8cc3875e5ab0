"""`flowport up`: run the gRPC server (`--workers` of them) and Envoy as child processes.

Start the servers, wait until each reports SERVING, start Envoy, wait until
`/healthz` answers 200 through it, print the URLs; on SIGINT/SIGTERM stop
the servers gracefully first (Envoy keeps relaying their in-flight answers),
then Envoy. Children run in their own process group, so a terminal's Ctrl-C
reaches only the supervisor, which then stops them in order; on Linux they
also get SIGTERM if the supervisor itself dies, so none is left behind.

The supervisor holds the data dir's lock (server/datadir.py) and hands it to
the servers it starts, so a second `flowport up` or `serve` on the same dir
is refused while this one runs.

With `--no-local-server` no server is started: Envoy alone runs in front of
the `--upstream` and `--upstream-dns` servers, which may still be starting
(it then reports none healthy yet and keeps running; /healthz answers 503
until one is).

Envoy reads the servers' endpoints from files in the data dir
(server/endpoint_files.py) that `flowport upstreams` rewrites to add or
remove upstreams while everything runs: Envoy applies them without a restart.

With several workers, each server process has its own port and is one
endpoint of Envoy's cluster (health-checked and ejected on its own, which
SO_REUSEPORT's kernel hashing could not do). A server that dies, lone or
one of several, is started again (after a delay that grows while it keeps
dying soon after its start); Envoy answers 503 for it meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from flowport.server.datadir import LOCK_FD_ENV, DataDirError, DataDirLock, open_data_dir, write_private
from flowport.server.endpoint_files import ENDPOINTS_DIR, Servers
from flowport.server.endpoint_files import write as write_endpoints
from flowport.server.envoy_binary import EnvoyNotFound, find_envoy
from flowport.server.settings import ENV_PREFIX, Settings
from flowport.transcoder.envoy_config import render

POLL_INTERVAL = 0.05
PR_SET_PDEATHSIG = 1


class UpError(RuntimeError):
    """`flowport up` could not start; the message says why."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def check_ports_free(settings: Settings) -> None:
    """Fail, naming the port and its flag, when one is already taken (the servers' only when they run here)."""
    local = not settings.no_local_server
    grpc_ports = [("--grpc-port" if n == 0 else f"--grpc-port+{n}", settings.grpc_host, port)
                  for n, port in enumerate(settings.grpc_ports) if local]  # fmt: skip
    websocket_ports = [("--websocket-port" if n == 0 else f"--websocket-port+{n}", settings.grpc_host, port)
                       for n, port in enumerate(settings.websocket_ports) if local]  # fmt: skip
    metrics = settings.metrics_port if local else 0
    for flag, host, port in (
        ("--http-port", settings.host, settings.http_port),
        *grpc_ports,
        *websocket_ports,
        ("--admin-port", "127.0.0.1", settings.admin_port),
        *([("--metrics-port", settings.metrics_host, metrics)] if metrics else []),
    ):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            # Envoy and gRPC set SO_REUSEADDR too, so TIME_WAIT is not "in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise UpError(f"port {port} ({flag}) on {host} is not available: {exc.strerror}") from None
    ports = [settings.http_port, *(p for _, _, p in grpc_ports + websocket_ports), settings.admin_port]
    if metrics:
        ports.append(metrics)
    if len(set(ports)) < len(ports):
        raise UpError(
            "--http-port, --admin-port, --metrics-port and the --grpc-port and --websocket-port ranges "
            "(one port per worker each) must not overlap"
        )


def child_environment(settings: Settings) -> dict[str, str]:
    """The environment that makes `flowport serve` load exactly `settings`."""
    env = dict(os.environ)
    env.pop(f"{ENV_PREFIX}CONFIG", None)
    for name, value in settings.model_dump().items():
        if isinstance(value, SecretStr):
            env[ENV_PREFIX + name.upper()] = value.get_secret_value()
        elif isinstance(value, list):
            env[ENV_PREFIX + name.upper()] = ",".join(map(str, value))
        elif value is not None:
            env[ENV_PREFIX + name.upper()] = str(value)
    return env


RESTART_DELAY = 1.0  # seconds before a server that died is started again
MAX_RESTART_DELAY = 30.0
# A server that ran this long before it died was not crash-looping: its next restart waits RESTART_DELAY again.
STABLE_RUN = 30.0


def restart_delay(quick_deaths: int) -> float:
    """Seconds to wait before starting a server again that died `quick_deaths` times in a row soon after starting."""
    # The exponent is capped: a server crash-looping all night must not overflow the float.
    return min(MAX_RESTART_DELAY, RESTART_DELAY * 2.0 ** min(max(0, quick_deaths - 1), 32))


def describe_exit(code: int) -> str:
    """'exited with code 1', or 'was killed by SIGKILL' for a signal."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


# prometheus_client's multi-process directory (server/observability/prometheus.py);
# spelled out here so the supervisor does not import the metrics library to start.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Supervisor:
    """The children and the order they start and stop in."""

    def __init__(self, settings: Settings, out: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.out = out
        # None with --no-local-server: Envoy alone, in front of the upstreams.
        self.servers: list[subprocess.Popen[bytes] | None] = (
            [] if settings.no_local_server else [None] * settings.workers
        )
        self.envoy: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.restarts = 0
        self.data_dir: DataDirLock | None = None
        self.clock: Callable[[], float] = time.monotonic  # what restart delays are measured with

    @property
    def server(self) -> subprocess.Popen[bytes] | None:
        """The first server process (None before it starts, and with --no-local-server)."""
        return self.servers[0] if self.servers else None

    def _server_settings(self, worker: int) -> Settings:
        update: dict[str, Any] = {"grpc_port": self.settings.grpc_ports[worker]}
        if self.settings.websocket_port:
            update["websocket_port"] = self.settings.websocket_ports[worker]
        if worker:  # the first worker serves every worker's metrics
            update["metrics_port"] = 0
        return self.settings.model_copy(update=update)

    @property
    def metrics_dir(self) -> Path:
        """Where workers write their Prometheus values (prometheus_client's multi-process mode)."""
        return self.settings.data_dir / "metrics"

    def _start_server(self, worker: int) -> subprocess.Popen[bytes]:
        env = child_environment(self._server_settings(worker))
        if self.settings.workers > 1:
            env[MULTIPROC_ENV] = str(self.metrics_dir)
        lock_fd = self.data_dir.fd if self.data_dir is not None else None
        if lock_fd is not None:
            env[LOCK_FD_ENV] = str(lock_fd)
        process = self._spawn(
            [sys.executable, "-m", "flowport.clients.cli", "serve"], env, () if lock_fd is None else (lock_fd,)
        )
        self.servers[worker] = process
        return process

    def _spawn(
        self, argv: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv,
            env=env,
            pass_fds=pass_fds,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )

    def start(self) -> None:
        """Start both children and wait until both are healthy."""
        s = self.settings
        # First: a port taken by another flowport on this dir is better explained by naming it.
        try:
            self.data_dir = open_data_dir(s.data_dir, "flowport up")
        except DataDirError as exc:
            raise UpError(str(exc)) from None
        for warning in self.data_dir.warnings:
            self.out(f"flowport: warning: {warning}")
        check_ports_free(s)
        try:
            envoy_bin = find_envoy(s.envoy)
        except EnvoyNotFound as exc:
            raise UpError(str(exc)) from None
        if s.workers > 1 and self.servers:
            # Values of an earlier run would be added to this one's.
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir.mkdir(mode=0o700)
        # Absolute paths: `flowport upstreams` finds this Envoy's by its config path (Envoy's /server_info).
        config_path = (s.data_dir / "envoy.json").resolve()
        endpoints_dir = (s.data_dir / ENDPOINTS_DIR).resolve()
        # The endpoints files first: Envoy reads them as it loads the bootstrap naming them.
        write_endpoints(endpoints_dir, Servers.of(s))
        write_private(config_path, json.dumps(render(s, endpoints_dir=endpoints_dir), indent=2))
        deadline = time.monotonic() + s.startup_timeout
        # The first server alone first: it migrates the database and makes
        # the admin key, which the others then find done.
        for batch in ([0], range(1, s.workers)) if self.servers else ():
            for worker in batch:
                self._start_server(worker)
            for worker in batch:
                process = self.servers[worker]
                assert process is not None
                target = self._server_settings(worker).grpc_target
                what = "server" if s.workers == 1 else f"server {worker + 1}"
                self._wait(process, what, lambda target=target: _grpc_serving(target), deadline)  # type: ignore[misc]
        self.envoy = self._spawn(
            [str(envoy_bin), "-c", str(config_path), "--disable-hot-restart", "--log-level", "warn"]
        )
        ready = f"http://127.0.0.1:{s.admin_port}/ready"
        if self.servers:
            self._wait(self.envoy, "Envoy", lambda: _http_ok(ready) and _http_ok(f"{s.http_url}/healthz"), deadline)
            return
        # Envoy alone: the upstreams are not ours to wait for (they may be deploying), only Envoy is.
        self._wait(self.envoy, "Envoy", lambda: _http_ok(ready), deadline)
        try:
            self._wait(self.envoy, "Envoy", lambda: _http_ok(f"{s.http_url}/healthz"), deadline)
        except UpError:
            if self.stopping.is_set() or self.envoy.poll() is not None:
                raise  # interrupted, or Envoy died
            self.out(
                f"flowport: warning: no upstream server is healthy after {s.startup_timeout:g}s (--startup-timeout); "
                "/healthz answers 503 until one passes its health check"
            )

    def _wait(self, proc: subprocess.Popen[bytes], what: str, ready: Callable[[], bool], deadline: float) -> None:
        while not ready():
            if proc.poll() is not None:
                raise UpError(f"the {what} exited with code {proc.returncode} while starting (see its log above)")
            if self.stopping.is_set():
                raise UpError("interrupted while starting")
            if time.monotonic() > deadline:
                raise UpError(
                    f"the {what} was not healthy within {self.settings.startup_timeout:g}s (--startup-timeout)"
                )
            time.sleep(POLL_INTERVAL)

    def wait(self) -> int:
        """Block until a signal or Envoy's exit; return the exit code to use.

        A server that exits is started again, RESTART_DELAY later, or longer
        while it keeps dying soon after its start (restart_delay). Envoy
        answers 503 for it meanwhile (with several workers it sends calls to
        the others), and executions it ran are resumed by the new process (a
        SQLite file) or taken over by the others once their leases run out.
        """
        count = len(self.servers)
        started = [self.clock()] * count
        died: list[float | None] = [None] * count
        quick_deaths = [0] * count
        while not self.stopping.wait(0.2):
            if self.envoy is not None and self.envoy.poll() is not None:
                self.out(f"flowport: Envoy {describe_exit(self.envoy.returncode)} unexpectedly; stopping")
                return 1
            for worker, proc in enumerate(self.servers):
                if proc is None or proc.poll() is None:
                    continue
                now = self.clock()
                died_at = died[worker]
                if died_at is None:
                    died[worker] = died_at = now
                    quick_deaths[worker] = 1 if now - started[worker] >= STABLE_RUN else quick_deaths[worker] + 1
                    what = "the server" if count == 1 else f"server {worker + 1}"
                    delay = restart_delay(quick_deaths[worker])
                    self.out(f"flowport: {what} {describe_exit(proc.returncode)}; starting it again in {delay:g}s")
                    # Its live gauges (open streams, running executions) are no longer live;
                    # its counters stay, so totals do not drop (prometheus_client's mark_process_dead).
                    for stale in self.metrics_dir.glob(f"gauge_live*_{proc.pid}.db"):
                        stale.unlink(missing_ok=True)
                if now - died_at < restart_delay(quick_deaths[worker]):
                    continue
                self._start_server(worker)
                started[worker], died[worker] = self.clock(), None
                self.restarts += 1
        return 0

    def stop(self) -> None:
        """Stop the servers gracefully (together), then Envoy; kill whatever overstays.

        The servers get SIGINT, which skips their drain (--drain-seconds): they all stop, and
        Envoy after them, so no other server would take the calls a drain keeps coming."""
        grace = self.settings.shutdown_grace
        groups = (
            ([p for p in self.servers if p is not None], grace + 5.0, signal.SIGINT),
            ([self.envoy], 5.0, signal.SIGTERM),
        )
        for group, timeout, sig in groups:
            running = [p for p in group if p is not None and p.poll() is None]
            for proc in running:
                proc.send_signal(sig)
            deadline = time.monotonic() + timeout
            for proc in running:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.data_dir is not None:
            self.data_dir.close()


def _grpc_serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:  # noqa: S310 - our own loopback URL
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def up(settings: Settings, out: Callable[[str], None] = print) -> int:
    """Run server and Envoy until SIGINT/SIGTERM; return the process exit code."""
    supervisor = Supervisor(settings, out)
    started = time.monotonic()

    def on_signal(signum: int, frame: object) -> None:
        supervisor.stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            supervisor.start()
        except UpError as exc:
            out(f"flowport: {exc}")
            return 2
        s = settings
        local = not s.no_local_server
        servers = ""
        if local and s.workers == 1:
            servers = f"  gRPC (server)        {s.grpc_target}\n"
        elif local:
            targets = ", ".join(supervisor._server_settings(n).grpc_target for n in range(s.workers))
            servers = f"  gRPC ({s.workers} servers)    {targets}\n"
        if s.upstreams:
            named = ", ".join(f"{u} (DNS)" if u.by_name else str(u) for u in s.upstreams)
            servers += f"  gRPC (upstreams)     {named}\n"
        out(
            f"flowport is up in {time.monotonic() - started:.2f}s\n"
            f"  REST + gRPC (Envoy)  {s.http_url}\n"
            + servers
            + f"  Envoy admin          http://127.0.0.1:{s.admin_port}\n"
            f"  data                 {Path(s.data_dir).resolve()}\n"
            + (
                f"  admin API key        {(s.data_dir / 'admin-api-key').resolve()} (send it as x-api-key)\n"
                if local and (s.data_dir / "admin-api-key").exists()
                else ""
            )
            + (
                f"  secrets key          {(s.data_dir / 'secrets-key').resolve()} (back it up)\n"
                if local
                and s.secrets_key is None
                and s.secrets_key_file is None
                and (s.data_dir / "secrets-key").exists()
                else ""
            )
            + "Press Ctrl-C to stop."
        )
        return supervisor.wait()
    finally:
        supervisor.stop()
        if supervisor.server is not None or supervisor.envoy is not None:
            out("flowport: stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
