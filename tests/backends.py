"""Real PostgreSQL and Redis servers for the tests: on 127.0.0.1, on free ports,
with their data in a temporary folder that is removed when they stop.

Both come from the Debian packages `postgresql` and `redis-server` (the
README's test command installs them). Nothing here needs a Python driver:
PostgreSQL is driven through its own command-line tools, Redis through a
few lines of RESP over a socket.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

# Debian puts every installed major version's server binaries here.
POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# PostgreSQL will not run as root; as root the server runs as this OS user
# (created by the Debian package).
POSTGRES_OS_USER = "postgres"
POSTGRES_ROLE = "flowport"
# Durability off: a test server's data is thrown away anyway.
POSTGRES_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
# Where redis-server may be when it is not on PATH.
REDIS_SERVER_PATHS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")
DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class BackendUnavailable(RuntimeError):
    """The server's binaries are not installed (as opposed to a server that failed to start)."""


_GIVEN: set[int] = set()
# Ports are drawn from below the kernel's ephemeral range, so a port handed out here is never
# taken meanwhile as the source port of some connection before its server binds it. Under
# pytest-xdist each worker draws from blocks of its own, so two workers never hand out one port.
_LOWEST_PORT = 10000
_BLOCK = 64


def _listening_ports() -> range:
    """The ports free_port draws from: from _LOWEST_PORT up to the ephemeral range's start."""
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first_ephemeral = 32768  # Linux's default
    return range(_LOWEST_PORT, max(first_ephemeral, _LOWEST_PORT + 64 * _BLOCK))


def _worker() -> tuple[int, int]:
    """(this process's pytest-xdist worker number, how many workers); (0, 1) outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    return (int(name[2:]) if name[2:].isdigit() else 0), max(int(count) if count.isdigit() else 1, 1)


def _unbound(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1) -> int:
    """The first of `count` consecutive ports on 127.0.0.1 nobody listens on right now, none handed
    out before by this process nor by another xdist worker (ports asked for together must differ,
    and a server with --workers N takes its base port and the N-1 after it)."""
    if not 1 <= count <= _BLOCK:
        raise ValueError(f"free_ports hands out 1 to {_BLOCK} consecutive ports, not {count}")
    worker, workers = _worker()
    ports = _listening_ports()
    while True:
        base = secrets.choice(ports)
        run = range(base, base + count)
        if (base // _BLOCK) % workers != worker or (base % _BLOCK) + count > _BLOCK or base + count > ports.stop:
            continue
        if any(port in _GIVEN for port in run) or not all(_unbound(port) for port in run):
            continue
        _GIVEN.update(run)
        return base


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now, never handed out before (free_ports)."""
    return free_ports(1)


def process_alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def child_pids(pid: int) -> set[int]:
    """The direct children of `pid`, from /proc."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            children.update(int(child) for child in (task / "children").read_text().split())
    return children


class OwnerGuard:
    """A detached watcher that runs `cleanup` (a shell command) once the process that
    started a server is gone, however it went: a test killed by its timeout, or a
    benchmark run killed with SIGKILL, must not leave PostgreSQL or Redis running.

    It lives in a session of its own so that killing the owner's process group does
    not take it along; `cancel()` ends it when the owner stops the server itself.
    """

    def __init__(self, cleanup: str, *, owner: int | None = None, poll: float = 0.5) -> None:
        owner = os.getpid() if owner is None else owner
        script = f"while kill -0 {owner} 2>/dev/null; do sleep {poll}; done; {cleanup}"
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def cancel(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def _version_key(bin_dir: Path) -> tuple[int, ...]:
    version = bin_dir.parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit()) or (0,)


def find_postgres_bin() -> Path:
    """The bin folder of the newest installed PostgreSQL (Debian layout first, then PATH)."""
    candidates = [path for path in Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/")) if (path / "postgres").is_file()]
    if candidates:
        return max(candidates, key=_version_key)
    on_path = shutil.which("pg_ctl")
    if on_path is not None and (Path(on_path).parent / "initdb").exists():
        return Path(on_path).resolve().parent
    raise BackendUnavailable(
        f"PostgreSQL is not installed: no {POSTGRES_BIN_GLOB}/postgres and no pg_ctl on PATH "
        "(install the Debian package `postgresql`)"
    )


def find_redis_server() -> Path:
    """The `redis-server` binary."""
    found = shutil.which("redis-server") or next((path for path in REDIS_SERVER_PATHS if Path(path).is_file()), None)
    if found is None:
        raise BackendUnavailable("Redis is not installed: no redis-server (install the Debian package `redis-server`)")
    return Path(found)


class PostgresServer:
    """A throwaway PostgreSQL cluster: `initdb` into a temporary folder, `pg_ctl start`
    on a free loopback port, trust authentication for the superuser `flowport`.

    `url` is the `flowport` database; `new_database()` makes another, empty one, so
    tests are isolated without restarting the server.
    """

    def __init__(self, *, bin_dir: Path | None = None, start_timeout: float = 60.0) -> None:
        self.bin_dir = bin_dir if bin_dir is not None else find_postgres_bin()
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.user = POSTGRES_ROLE
        self.port = 0
        self.base_dir: Path | None = None
        self._run_as: list[str] = []
        self._counter = 0
        self._guard: OwnerGuard | None = None

    # -- paths and urls ------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None, "PostgresServer is not started"
        return self.base_dir / "data"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None, "PostgresServer is not started"
        return self.base_dir / "postgres.log"

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """The `flowport` database, e.g. postgresql://flowport@127.0.0.1:54321/flowport."""
        return self.url_for(POSTGRES_ROLE)

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs (from postmaster.pid)."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (AssertionError, OSError, ValueError):
            return None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """initdb, start on a free port (a few tries, in case the port is taken meanwhile), create `flowport`."""
        if self.base_dir is None:
            self._prepare()
        failure = ""
        for _ in range(3):
            self.port = free_port()
            started = self._tool(
                "pg_ctl",
                "start",
                "--wait",
                f"--timeout={int(self.start_timeout)}",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-o",
                self._server_options(),
                check=False,
            )
            if started.returncode == 0:
                break
            failure = started.stdout + started.stderr + self._log_tail()
            if "already in use" not in failure:
                break
        if started.returncode != 0:
            self.stop()
            raise RuntimeError(f"PostgreSQL did not start:\n{failure}")
        # pg_ctl detaches the postmaster into a session of its own: nothing but this
        # guard stops it if we are killed before stop() runs.
        pg_ctl = shlex.join([*self._run_as, str(self.bin_dir / "pg_ctl")])
        self._guard = OwnerGuard(
            f"{pg_ctl} stop -m immediate -D {shlex.quote(str(self.data_dir))}; rm -rf {shlex.quote(str(self.base_dir))}"
        )
        self._wait_ready()
        self.sql(f"CREATE DATABASE {POSTGRES_ROLE}", database="postgres")

    def stop(self) -> None:
        """Stop at once (no shutdown checkpoint: the data is discarded) and remove the folder."""
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
        if self.base_dir is None:
            return
        if (self.data_dir / "postmaster.pid").exists():
            self._tool("pg_ctl", "stop", "--wait", "-m", "immediate", "-D", str(self.data_dir), check=False)
        pid = self.pid
        if pid is not None and process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- databases -----------------------------------------------------------

    def new_database(self, name: str | None = None) -> str:
        """Create an empty database (named `name`, or `test_<n>`) and return its url."""
        if name is None:
            self._counter += 1
            name = f"test_{os.getpid()}_{self._counter}"
        self._check_name(name)
        self.sql(f"CREATE DATABASE {name}", database="postgres")
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still connected to it."""
        self._check_name(name)
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", database="postgres")

    def sql(self, statement: str, *, database: str = POSTGRES_ROLE) -> str:
        """Run one statement through psql; returns its unaligned, tuples-only output."""
        result = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "--no-psqlrc",
                "--quiet",
                "--tuples-only",
                "--no-align",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-c",
                statement,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=self._environment(),
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed on {statement!r}: {result.stderr.strip()}")
        return result.stdout.strip()

    # -- internals -----------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> None:
        if not DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r} must match {DATABASE_NAME.pattern}")

    def _prepare(self) -> None:
        """A temporary folder (owned by the `postgres` user when we are root) and `initdb` into it."""
        base = Path(tempfile.mkdtemp(prefix="flowport-pg-"))
        self.base_dir = base
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(POSTGRES_OS_USER)
            except KeyError:
                self.stop()
                raise RuntimeError(
                    f"PostgreSQL refuses to run as root and there is no {POSTGRES_OS_USER!r} user to run it as "
                    "(the Debian package `postgresql` creates it)"
                ) from None
            os.chown(base, owner.pw_uid, owner.pw_gid)
            self._run_as = self._switch_user_prefix(POSTGRES_OS_USER)
        try:
            self._tool(
                "initdb",
                "-D",
                str(self.data_dir),
                "--auth=trust",
                f"--username={POSTGRES_ROLE}",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            )
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _switch_user_prefix(user: str) -> list[str]:
        runuser = shutil.which("runuser")
        if runuser is not None:
            return [runuser, "-u", user, "--"]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            entry = pwd.getpwnam(user)
            return [setpriv, f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--"]
        raise RuntimeError("running PostgreSQL as root needs runuser or setpriv to switch to the postgres user")

    def _server_options(self) -> str:
        assert self.base_dir is not None
        options = ["-p", str(self.port), "-k", str(self.base_dir), "-c", f"listen_addresses={self.host}"]
        for setting in POSTGRES_FAST_SETTINGS:
            options += ["-c", setting]
        # pg_ctl hands -o to a shell, hence the quoting.
        return shlex.join(options)

    @staticmethod
    def _environment() -> dict[str, str]:
        """Our environment without PG* variables, which would point the tools elsewhere."""
        return {key: value for key, value in os.environ.items() if not key.startswith("PG")}

    def _tool(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a server tool (initdb, pg_ctl) as the user the server runs as, from the temporary folder."""
        result = subprocess.run(
            [*self._run_as, str(self.bin_dir / name), *args],
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=self.start_timeout + 30,
            env=self._environment(),
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
        return result

    def _wait_ready(self) -> None:
        """Until pg_isready says the server accepts connections on its TCP port."""
        deadline = time.monotonic() + self.start_timeout
        while True:
            ready = subprocess.run(
                [str(self.bin_dir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port), "-U", self.user],
                env=self._environment(),
                timeout=30,
                check=False,
            )
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} is not ready:\n{self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (AssertionError, OSError):
            return ""


class RedisError(RuntimeError):
    """An error reply from Redis (`-ERR …`)."""


RedisReply = bytes | int | list["RedisReply"] | None


class RedisServer:
    """A `redis-server` child process on a free loopback port, without persistence.

    `stop()` and `start()` again keep the port, so a test can take Redis away
    mid-run and bring it back where clients expect it.
    """

    def __init__(self, *, binary: Path | None = None, start_timeout: float = 30.0) -> None:
        self.binary = binary if binary is not None else find_redis_server()
        self.start_timeout = start_timeout
        self.host = "127.0.0.1"
        self.port = free_port()
        self.base_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._guard: OwnerGuard | None = None

    @property
    def url(self) -> str:
        """e.g. redis://127.0.0.1:63790/0."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_file(self) -> Path:
        assert self.base_dir is not None, "RedisServer was never started"
        return self.base_dir / "redis.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start (again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="flowport-redis-"))
        argv = [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.base_dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_file),
        ]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=self.base_dir)
        self._guard = OwnerGuard(f"kill -9 {self.process.pid}; rm -rf {shlex.quote(str(self.base_dir))}")
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                if self.command("PING", timeout=1.0) == b"PONG":
                    return
            except (OSError, RedisError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._halt()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{self._log_tail()}")
            time.sleep(0.02)

    def stop(self, *, kill: bool = False) -> None:
        """Stop the process (SIGTERM, or SIGKILL with `kill=True`); the folder stays for a later start()."""
        self._halt(signal.SIGKILL if kill else signal.SIGTERM)

    def close(self) -> None:
        """Stop and remove the folder."""
        self._halt()
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def flushall(self) -> None:
        """Empty every database."""
        assert self.command("FLUSHALL") == b"OK"

    def command(self, *args: str | bytes | int, timeout: float = 5.0) -> RedisReply:
        """Send one command on a fresh connection and return the decoded reply (raises RedisError on `-ERR`)."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(encode_command(args))
            with sock.makefile("rb") as reader:
                return read_reply(reader)

    def _halt(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (AssertionError, OSError):
            return ""


def encode_command(args: Sequence[str | bytes | int]) -> bytes:
    """A command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def read_reply(reader: BinaryIO) -> RedisReply:
    """One RESP2 reply from a binary file object."""
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("Redis closed the connection")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body
    if kind == b"-":
        raise RedisError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        return reader.read(size + 2)[:-2]
    if kind == b"*":
        count = int(body)
        return None if count < 0 else [read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected reply from Redis: {line!r}")
