"""A sandbox worker process: runs user code for the parent pool, one job at a time.

Started as `python -m flowport.server.sandbox.worker CONFIG`, where CONFIG is
JSON with `cpu_seconds`, `memory_bytes`, `wall_seconds` and `read_allowlist`. The protocol
runs over private duplicates of fds 0 and 1 (fd 1 itself is pointed at
stderr, so a stray print cannot corrupt it), with `os.read`/`os.write`,
which raise no audit events. A frame is a 4-byte big-endian length and an
orjson payload.

Parent to worker: `{"id", "op": "ping"}` or `{"id", "key", "code", "inputs"}`
(`code` is null when this worker has compiled `key` before).
Worker to parent: `{"id", "status": ...}` replies, and at any time during a
job `{"violation": message}` (from the audit hook) or `{"cpu": true}` (the
CPU limit fired). Those two cannot be suppressed by the user code, which
may catch the exceptions that go with them.

A worker ends with its server, however the server ends (kill -9 included):
between jobs it reads end-of-file on its request pipe; during one, the
kernel's SIGIO for that pipe's closing stops it (see _exit_with_parent).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import posix
import re
import resource
import select
import signal
import sys
import time
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from flowport.server.sandbox import policy
from flowport.server.sandbox.landlock import ENV_RESULT, ENV_SECCOMP

USER_FILENAME = "<code>"
CODE_CACHE_SIZE = 256
# The largest `result`, as JSON: parsing JSON in the server costs up to ~30
# times its size in memory, so this bounds what one job can make it hold.
MAX_RESULT = 4 * 2**20
# The parent refuses any longer frame (a reply is the result plus a little).
MAX_FRAME = MAX_RESULT + 64 * 2**10
MAX_MESSAGE = 2000
CPU_REFIRE = 0.05  # CPU seconds between repeated SIGPROFs once the limit is hit
ORPHAN_MARGIN = 10.0
ORPHANED = 4  # exit status of a worker whose server died
NOFILE = 32
NOBODY = 65534
READ_CHUNK = 1 << 16

Reply = dict[str, Any]
# Bound at import: the policy removes raw descriptor I/O from posix before
# user code runs, and the worker's own pipes need it.
_READ, _WRITE = posix.read, posix.write


class CpuLimitExceeded(BaseException):
    """Raised inside user code by SIGPROF; a BaseException so `except Exception` does not catch it."""


def frame(message: Reply) -> bytes:
    """A protocol frame: 4-byte big-endian length, then the orjson payload."""
    payload = orjson.dumps(message)
    return len(payload).to_bytes(4, "big") + payload


def _warm_up() -> None:
    """Exercise what user code commonly calls, so lazy imports and caches happen before the hook."""
    import copy
    import dataclasses
    import decimal
    import enum
    import functools
    import hashlib
    import hmac
    import statistics
    import string
    import textwrap
    import typing
    import unicodedata
    import uuid
    import zoneinfo

    datetime.datetime.strptime("2024-01-02 03:04", "%Y-%m-%d %H:%M").astimezone(zoneinfo.ZoneInfo("UTC"))
    datetime.datetime.now().astimezone().isoformat()
    time.strptime("2024", "%Y")
    "x".encode("idna")
    _ = decimal.Decimal("1.5") * 2, statistics.mean([1, 2]), uuid.uuid4(), re.findall(r"\d+", "a1")
    _ = hashlib.sha256(b"").hexdigest(), hmac.new(b"k", b"m", "sha256").hexdigest(), copy.deepcopy({"a": [1]})
    _ = textwrap.dedent(" x"), string.Template("$a").substitute(a=1), unicodedata.normalize("NFC", "e")
    _ = typing.NamedTuple("Point", [("x", int)]), functools.singledispatch(str)
    item = dataclasses.make_dataclass("Item", [("n", int)])(1)

    class Color(enum.Enum):
        RED = 1

    orjson.dumps([item, uuid.uuid4(), datetime.date.today(), Color.RED], option=orjson.OPT_NON_STR_KEYS)
    json.loads(json.dumps({"a": [1.5, None]}))


def _claim_protocol_fds() -> tuple[int, int]:
    """Move the protocol to private fds; fd 0 reads /dev/null and fd 1 goes to stderr."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    # print() in user code is discarded: stdout is not a channel back.
    sys.stdout = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    return proto_in, proto_out


def _limit_resources(memory_bytes: int, cpu_budget: float) -> float:
    """Kernel limits for the rest of the worker's life; returns the CPU time at which to retire."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # no file can grow, whatever the hook misses
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    # No fork and no threads (root ignores this, hence the switch to nobody).
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    # RLIMIT_CPU counts the whole process life, so it is a budget for many
    # jobs: the worker asks to be replaced before it runs out (see retire_at).
    soft = math.ceil(time.process_time() + cpu_budget)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 5))
    return float(soft)


def _drop_privileges() -> None:
    """As root, become nobody: kill(), /root and RLIMIT_NPROC then hold even if the hook is bypassed."""
    if os.geteuid() != 0:
        return
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    except OSError as exc:  # e.g. a user namespace that does not map nobody: the other layers still hold
        sys.stderr.write(f"sandbox worker stays root, cannot switch to uid {NOBODY}: {exc}\n")


def _exit_with_parent(proto_in: int, parent: int) -> None:
    """Exit as soon as the server (`parent`) is gone, even while user code runs.

    The request channel is set to signal SIGIO on every change, its closing
    included, which the kernel does for a server that dies, before it hands
    the server's children to another parent. SIGIO also comes with each
    request, so the handler asks whether the server's end hung up. (The
    kernel's PR_SET_PDEATHSIG needs ctypes, which must not be loaded here, and
    the switch to nobody would clear it anyway.) The handler holds only ints
    and C functions, like the CPU one.
    """
    hangup = select.poll()
    hangup.register(proto_in, select.POLLHUP)  # a hang-up or an error; never a request
    del sys.modules["select"]  # nothing of it stays for user code to find
    hung_up, getppid, exit_now = hangup.poll, os.getppid, os._exit

    def on_sigio(signum: int, current: types.FrameType | None) -> None:
        if hung_up(0) or getppid() != parent:
            exit_now(ORPHANED)

    signal.signal(signal.SIGIO, on_sigio)
    fcntl.fcntl(proto_in, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(proto_in, fcntl.F_SETFL, fcntl.fcntl(proto_in, fcntl.F_GETFL) | os.O_ASYNC)


def _make_cpu_handler(report_fd: int) -> Callable[[int, types.FrameType | None], None]:
    """The SIGPROF handler: tells the parent, then raises in user code.

    It raises only while the job timer runs and user code is on the stack, so
    it never interrupts the worker's own code. Like the audit hook, its frame
    holds only immutable values and C functions (user code sees it in the
    traceback of CpuLimitExceeded).
    """
    getitimer, write, which, filename = signal.getitimer, _WRITE, signal.ITIMER_PROF, USER_FILENAME
    notice, exceeded, os_error = frame({"cpu": True}), CpuLimitExceeded, OSError

    def on_sigprof(signum: int, current: types.FrameType | None) -> None:
        if getitimer(which) == (0.0, 0.0):
            return  # the job is over
        while current is not None:
            if current.f_code.co_filename == filename:
                try:  # noqa: SIM105 - contextlib would put a Python object in this frame
                    write(report_fd, notice)
                except os_error:
                    pass  # the parent is gone
                raise exceeded("CPU time limit exceeded")
            current = current.f_back

    return on_sigprof


def _describe(exc: BaseException, frame_gate: bytearray) -> tuple[str, str, int | None]:
    """(message, exception type name, line of the user's code) for an exception from user code.

    An import the policy refused is described by the refusal alone. The
    traceback walk needs `tb_frame`, which the audit hook refuses unless
    `frame_gate` is open; nothing of user code runs while it is.
    """
    line = None
    tb = exc.__traceback__
    frame_gate[0] = 1
    try:
        while type(tb) is types.TracebackType:
            if tb.tb_frame.f_code.co_filename == USER_FILENAME:
                line = tb.tb_lineno
            tb = tb.tb_next
    finally:
        frame_gate[0] = 0
    name = type(exc).__name__
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - the user's __str__ failed; the type still says something
        text = ""
    message = f"{name}: {text}" if text and not policy.is_import_refusal(exc) else text or name
    if line is not None:
        message += f" (line {line})"
    return message[:MAX_MESSAGE], name, line


# SQL nodes (and JSON generally) carry dates and times as ISO 8601 strings.
# Code written for drivers that return datetime objects calls .isoformat() on
# them (the Kailash examples do): such strings arrive as `Timestamp`, a str
# that also has isoformat(), so that code runs and every str use still works.
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?")
_ISO_DEPTH = 32  # deeper values stay as they came


class Timestamp(str):
    """An ISO 8601 date or date-time string that, like datetime objects, has isoformat()."""

    __slots__ = ()

    def isoformat(self, *args: Any, **kwargs: Any) -> str:
        """What the date or datetime object would give: "2024-01-03T10:20:30" for "2024-01-03 10:20:30"."""
        if len(self) == len("YYYY-MM-DD"):
            return datetime.date.fromisoformat(self).isoformat()
        try:
            return datetime.datetime.fromisoformat(self).isoformat(*args, **kwargs)
        except ValueError:  # a form fromisoformat does not read (more than 6 fraction digits)
            if args or kwargs:
                raise
            return str(self)


def with_timestamps(value: Any, depth: int = 0) -> Any:
    """`value` with its ISO 8601 strings as `Timestamp`s (at most _ISO_DEPTH levels down)."""
    if isinstance(value, str):
        return Timestamp(value) if 10 <= len(value) <= 40 and value[4:5] == "-" and _ISO.fullmatch(value) else value
    if depth >= _ISO_DEPTH:
        return value
    if isinstance(value, dict):
        return {key: with_timestamps(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [with_timestamps(item, depth + 1) for item in value]
    return value


class _Runner:
    """Runs jobs: the compile cache, the per-job namespace, the CPU timer and the reply."""

    def __init__(self, cpu_seconds: float, wall_seconds: float, retire_at: float, frame_gate: bytearray) -> None:
        self.cpu_seconds = cpu_seconds
        self.frame_gate = frame_gate
        # The parent enforces the wall clock; this SIGALRM (default action:
        # exit) only ends a job whose parent died, e.g. code stuck in sleep().
        self.orphan_seconds = wall_seconds + ORPHAN_MARGIN
        self.retire_at = retire_at
        # The confinement landlock.py put this worker in: its ABI, or "0: why not".
        self.landlock = os.environ.get(ENV_RESULT, "0: started without landlock.py")
        self.seccomp = os.environ.get(ENV_SECCOMP, "0: started without landlock.py")
        self.cache: OrderedDict[str, types.CodeType] = OrderedDict()
        self.builtins = policy.safe_builtins()
        self.globals: dict[str, Any] = {
            "__name__": "__main__",
            "datetime": datetime.datetime,
            "date": datetime.date,
            "timedelta": datetime.timedelta,
            "json": json,
            "math": math,
            "re": re,
        }
        # Bound now, so user code that monkeypatches modules cannot reach in.
        self.setitimer, self.process_time, self.threads = signal.setitimer, time.process_time, _thread_count()
        self.recursion_limit, self.setrecursionlimit = sys.getrecursionlimit(), sys.setrecursionlimit
        self.dumps, self.compile, self.exec = orjson.dumps, compile, exec

    def handle(self, request: Reply) -> Reply:
        job_id = request["id"]
        if request.get("op") == "ping":
            return {"id": job_id, "status": "pong", "landlock": self.landlock, "seccomp": self.seccomp}
        key = request["key"]
        code = self.cache.get(key)
        if code is not None:
            self.cache.move_to_end(key)
        elif request.get("code") is None:
            return {"id": job_id, "status": "missing"}  # evicted: the parent resends the code
        else:
            try:
                code = self.compile(request["code"], USER_FILENAME, "exec", dont_inherit=True)
            except SyntaxError as exc:
                message = f"SyntaxError: {exc.msg}" + (f" (line {exc.lineno})" if exc.lineno is not None else "")
                return self.error(job_id, "syntax", message, "SyntaxError", exc.lineno)
            except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
                return self.error(job_id, "syntax", f"code cannot be compiled: {type(exc).__name__}: {exc}")
            self.cache[key] = code
            if len(self.cache) > CODE_CACHE_SIZE:
                self.cache.popitem(last=False)
        namespace = self.globals.copy()
        namespace.update(with_timestamps(request["inputs"]))
        namespace["__builtins__"] = self.builtins.copy()
        reply = self.execute(job_id, code, namespace)
        if self.threads() > 0 or self.process_time() + self.cpu_seconds + 1 > self.retire_at:
            # A thread user code left running, or the RLIMIT_CPU budget nearly spent.
            reply["retire"] = True
        return reply

    def execute(self, job_id: int, code: types.CodeType, namespace: dict[str, Any]) -> Reply:
        self.setrecursionlimit(self.recursion_limit)
        self.setitimer(signal.ITIMER_REAL, self.orphan_seconds)
        self.setitimer(signal.ITIMER_PROF, self.cpu_seconds, CPU_REFIRE)
        try:
            return self.run_user_code(job_id, code, namespace)
        except CpuLimitExceeded:
            return self.error(job_id, "cpu", f"CPU time limit exceeded ({self.cpu_seconds:g} s)", retire=True)
        except MemoryError:
            return self.error(job_id, "memory", "memory limit exceeded", retire=True)
        finally:
            self.setitimer(signal.ITIMER_PROF, 0.0, 0.0)
            # Timers user code may have armed must not fire in the next job.
            self.setitimer(signal.ITIMER_REAL, 0.0, 0.0)
            self.setitimer(signal.ITIMER_VIRTUAL, 0.0, 0.0)

    def run_user_code(self, job_id: int, code: types.CodeType, namespace: dict[str, Any]) -> Reply:
        # Everything user code can influence (its __str__, properties read
        # while serializing, __del__ on clearing) runs here, under the timer.
        try:
            try:
                self.exec(code, namespace)
            except (CpuLimitExceeded, MemoryError):
                raise
            except BaseException as exc:  # noqa: BLE001 - whatever user code raises is its error
                message, name, line = _describe(exc, self.frame_gate)
                kind = "policy" if policy.is_import_refusal(exc) else "user"
                return self.error(job_id, kind, message, name, line)
            unsupported: list[str] = []

            def refuse(value: Any) -> Any:
                if isinstance(value, tuple):
                    return list(value)  # namedtuples, as json.dumps does
                unsupported.append(type(value).__name__)
                raise TypeError

            value = namespace.get("result")
            if isinstance(value, str | bytes) and len(value) > MAX_RESULT:
                # Checked first: orjson crashes on a string too big for RLIMIT_AS.
                return self.error(
                    job_id, "result", f"result is too large ({len(value)} characters, at most {MAX_RESULT})"
                )
            try:
                result = self.dumps(value, default=refuse, option=orjson.OPT_NON_STR_KEYS)
            except orjson.JSONEncodeError as exc:
                why = f"type {unsupported[0]!r}" if unsupported else str(exc)
                return self.error(job_id, "result", f"result is not JSON-serializable: {why}")
        finally:
            namespace.clear()
        if len(result) > MAX_RESULT:
            return self.error(job_id, "result", f"result is too large ({len(result)} bytes, at most {MAX_RESULT})")
        return {"id": job_id, "status": "ok", "result": orjson.Fragment(result)}

    def error(
        self, job_id: int, kind: str, message: str, name: str | None = None, line: int | None = None, *,
        retire: bool = False,
    ) -> Reply:  # fmt: skip
        reply: Reply = {"id": job_id, "status": "error", "kind": kind, "message": message}
        if name is not None:
            reply["type"] = name
        if line is not None:
            reply["line"] = line
        if retire:
            reply["retire"] = True
        return reply


def _thread_count() -> Callable[[], int]:
    import _thread

    return _thread._count


def _serve(proto_in: int, proto_out: int, runner: _Runner) -> None:
    """Answer frames until the parent closes the pipe (or dies)."""
    read, write, loads = _READ, _WRITE, orjson.loads
    buffer = bytearray()
    while True:
        size = -1
        while size < 0 or len(buffer) < 4 + size:
            if size < 0 and len(buffer) >= 4:
                size = int.from_bytes(buffer[:4], "big")
                continue
            chunk = read(proto_in, max(READ_CHUNK, 4 + size - len(buffer)))
            if not chunk:
                return
            buffer += chunk
        request = loads(bytes(buffer[4 : 4 + size]))
        del buffer[: 4 + size]
        try:
            reply = frame(runner.handle(request))
        except MemoryError:
            reply = frame(runner.error(request["id"], "memory", "memory limit exceeded", retire=True))
        view = memoryview(reply)
        while view:
            view = view[write(proto_out, view) :]


def main(argv: list[str]) -> None:
    # The server, while it lives; read first: should it die before the pipe
    # signals, the first read here finds the end of the file instead.
    parent = os.getppid()
    config = orjson.loads(argv[1])
    cpu_seconds = float(config["cpu_seconds"])
    read_allowlist = [str(p) for p in config.get("read_allowlist", ())]
    policy.preload()
    _warm_up()
    unsafe = policy.unsafe_loaded()
    if unsafe:
        sys.stderr.write(f"sandbox worker refuses to start: unsafe modules loaded: {', '.join(unsafe)}\n")
        sys.exit(3)
    internal_roots, excluded_roots = policy.internal_read_roots(read_allowlist)
    user_roots = tuple(os.path.realpath(p) for p in read_allowlist)
    proto_in, proto_out = _claim_protocol_fds()
    os.chdir("/")
    sys.path[:] = [
        p
        for p in sys.path
        if any(p.startswith(r) for r in internal_roots) and not any(p.startswith(r) for r in excluded_roots)
    ]
    sys.dont_write_bytecode = True
    # dataclasses and typing look up a class's module; give user classes an
    # empty one rather than this worker's.
    sys.modules["__main__"] = types.ModuleType("__main__")
    retire_at = _limit_resources(int(config["memory_bytes"]), max(60.0, 20 * cpu_seconds))
    frame_gate = bytearray(1)
    runner = _Runner(cpu_seconds, float(config["wall_seconds"]), retire_at, frame_gate)
    _drop_privileges()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops the workers
    for default in (signal.SIGALRM, signal.SIGXCPU, signal.SIGTERM):
        signal.signal(default, signal.SIG_DFL)  # these end the worker, whatever the parent had
    signal.signal(signal.SIGPROF, _make_cpu_handler(proto_out))
    _exit_with_parent(proto_in, parent)
    hook = policy.make_hook(
        internal_roots=internal_roots,
        excluded_roots=excluded_roots,
        user_roots=user_roots,
        source_name=USER_FILENAME,
        report_fd=proto_out,
        frame_gate=frame_gate,
    )
    policy.remove_unaudited()
    # Nothing of flowport stays importable or reachable through sys.modules:
    # the worker's functions and the policy are held by this frame only.
    for name in [n for n in sys.modules if n == "flowport" or n.startswith("flowport.")]:
        del sys.modules[name]
    sys.addaudithook(hook)
    del hook
    _serve(proto_in, proto_out, runner)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)
