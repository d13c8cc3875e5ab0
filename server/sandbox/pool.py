"""SandboxPool: warm worker processes that run user code, one job at a time each.

`run()` takes an idle worker (waiting when all are busy), sends the job, and
puts the worker back. A worker that timed out, crashed, ran out of memory,
hit the CPU limit, was refused something, or whose caller was cancelled is
killed and replaced in the background, so the next `run()` finds a fresh one.
User code never runs in this process.

A worker serves one tenant for its whole life. The audit hook refuses frame
introspection and the worker keeps nothing of one job in reach of the next,
but code that runs in a process can always leave something behind for later
code in that process (a patched stdlib function, a value hidden in a module):
the only boundary that holds whatever user code does is the process. So a
worker that ran tenant A's code is never given tenant B's job: B gets a fresh
worker, and when none is idle, the least recently used idle worker of another
tenant is killed to make room. Within a tenant, jobs share workers (that is
what keeps them warm).

Workers are shared fairly between tenants: a tenant holds at most
`tenant_share` workers at once, and callers waiting for a worker are served
round-robin across tenants (server/sandbox/fairness.py), so a tenant that
queued many jobs does not make another tenant's job wait behind all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from flowport.server import json_parse
from flowport.server.ids import random_bytes
from flowport.server.sandbox import landlock
from flowport.server.sandbox.errors import (
    SandboxCrashed,
    SandboxError,
    SandboxMemoryError,
    SandboxPolicyViolation,
    SandboxTimeout,
    UserCodeError,
)
from flowport.server.sandbox.fairness import FairQueue
from flowport.server.sandbox.worker import CODE_CACHE_SIZE, MAX_FRAME

log = logging.getLogger(__name__)

WORKER_MODULE = "flowport.server.sandbox.worker"
START_TIMEOUT = 30.0  # a cold interpreter importing everything, on a busy machine
PING_TIMEOUT = 5.0
STDERR_TAIL = 4096
# What the server reads of a worker's stderr in its life. User code can
# write there; past this the server closes its end of the pipe.
STDERR_CAP = 256 * 2**10
STDERR_CHUNK = 64 * 2**10
# CPU seconds an idle worker may use (between jobs it should use none), and
# how much past its limit a job may run before the server's watchdog kills
# the worker: code that fooled the protocol or ignores its CPU timer does
# not keep a core busy.
IDLE_CPU = 0.5
CPU_GRACE = 0.5
WATCH_INTERVAL = 0.25
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RESPAWN_DELAYS = (0.1, 0.5, 1.0, 2.0, 5.0)
# The worker gets no secrets from the server's environment: user code can read
# os.environ without raising any audit event.
ENV_KEEP = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "PYTHONHOME", "SYSTEMROOT")


@dataclass(frozen=True)
class SandboxLimits:
    """Per-job limits of the sandbox."""

    cpu_seconds: float = 5.0  # CPU time per job
    memory_bytes: int = 512 * 2**20  # address-space limit of a worker (RLIMIT_AS)
    wall_seconds: float = 30.0  # wall-clock limit per job; a per-call timeout may lower it


@dataclass
class SandboxStats:
    """Counters since the pool started."""

    jobs: int = 0  # runs that reached a worker
    failures: int = 0  # runs that raised a SandboxError
    workers_replaced: int = 0
    tenant_switches: int = 0  # idle workers killed so another tenant could have a fresh one
    share_waits: int = 0  # runs that waited because their tenant held its share of workers


class _Lost(Exception):
    """The worker stopped answering properly: it died, or sent a malformed frame."""


@functools.lru_cache(maxsize=1024)
def _code_key(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()


def _new_job_id() -> int:
    # Unpredictable, so frames user code forges cannot pass for a later job's reply.
    return int.from_bytes(random_bytes(8), "big") >> 1


class _Worker:
    """One worker process and what the pool knows about it."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        self.process = process
        self.pid = process.pid
        self.reader = process.stdout
        self.writer = process.stdin
        # Code keys this worker has compiled, in its LRU order (mirrors its cache).
        self.known: OrderedDict[str, None] = OrderedDict()
        self.stderr = bytearray()
        self.stderr_task = asyncio.create_task(self._drain_stderr(process.stderr))
        self.killed = False
        # The tenant whose code this worker runs; None until its first job.
        self.tenant: str | None = None
        # Handed to a job of `tenant` (counted in its share) until released.
        self.held = False
        # CPU time at the last allow_cpu(), and how much more it may use.
        self.cpu_mark: float | None = None
        self.cpu_allowance = START_TIMEOUT
        # Per job: set by the wall-clock timer and by the worker's notices.
        self.expired = False
        self.cpu_exceeded = False
        self.violations: list[str] = []

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        # Keep only a tail, for crash messages; user code can write here.
        read = 0
        while read < STDERR_CAP and (chunk := await stream.read(STDERR_CHUNK)):
            read += len(chunk)
            self.stderr += chunk
            del self.stderr[:-STDERR_TAIL]
        if read >= STDERR_CAP:
            # Close our end: the worker's further writes fail at once (EPIPE)
            # instead of costing this process CPU, or blocking on a full pipe
            # that would keep the process from ever being reaped.
            transport = getattr(self.process, "_transport", None)
            pipe = transport.get_pipe_transport(2) if transport is not None else None
            if pipe is not None:
                pipe.close()
            else:
                while await stream.read(STDERR_CHUNK):
                    pass

    def begin_job(self) -> None:
        self.expired = self.cpu_exceeded = False
        self.violations.clear()

    def expire(self) -> None:
        self.expired = True
        self.kill()

    def kill(self) -> None:
        # os.kill, once: Process.kill() polls the child first (Popen.send_signal),
        # which can reap it behind the event loop's child watcher.
        if not self.killed and self.process.returncode is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.writer.close()

    async def reap(self) -> int:
        """Wait until the process is gone and its stderr read; its exit status."""
        status = await self.process.wait()
        await asyncio.gather(self.stderr_task, return_exceptions=True)
        return status

    def last_stderr_line(self) -> str:
        lines = bytes(self.stderr).decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:500] if lines else ""

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and read frames until its reply.

        The worker is not trusted: user code can reach its pipes. So the
        first frame that is not the reply ends the job (and the worker): a
        refusal or CPU notice is recorded first, anything else is a broken
        protocol. A frame longer than a reply can be is refused unread.
        """
        job_id = request["id"]
        payload = orjson.dumps(request)
        self.writer.write(len(payload).to_bytes(4, "big") + payload)
        await self.writer.drain()
        size = int.from_bytes(await self.reader.readexactly(4), "big")
        if size > MAX_FRAME:
            raise _Lost(f"sent a frame of {size} bytes")
        message = json_parse.loads(await self.reader.readexactly(size))
        if type(message) is not dict:
            raise _Lost("sent a malformed frame")
        if message.get("id") == job_id:
            return message
        if "violation" in message:
            self.violations.append(str(message["violation"])[:1000])
            raise _Lost("was refused an operation")
        if "cpu" in message:
            self.cpu_exceeded = True
            raise _Lost("ran out of CPU time")
        raise _Lost("answered for another job")

    def cpu_seconds(self) -> float | None:
        """CPU time the process has used (user + system), from /proc; None if unknown."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def allow_cpu(self, allowance: float) -> None:
        """From now on, the process may use `allowance` more CPU seconds (the watchdog checks).

        Enforced by the server, outside the worker's reach, so it holds
        whatever user code did to the worker's own timer or protocol. The
        watchdog's next sample is the starting point (reading /proc here, twice
        per job, would cost more than the rest of the round trip): up to one
        watch interval of CPU goes uncounted.
        """
        self.cpu_mark = None
        self.cpu_allowance = allowance

    def over_cpu(self) -> bool:
        """Whether it used more than its allowance since allow_cpu (called by the watchdog)."""
        used = self.cpu_seconds()
        if used is None:
            return False
        if self.cpu_mark is None:
            self.cpu_mark = used
            return False
        return used - self.cpu_mark > self.cpu_allowance


class SandboxPool:
    """A fixed number of warm sandbox workers; `run()` executes user code in one of them."""

    def __init__(
        self,
        size: int = 2,
        limits: SandboxLimits = SandboxLimits(),
        read_allowlist: Sequence[str] = (),
        *,
        tenant_share: int | None = None,
        landlock_mode: str = "auto",
    ) -> None:
        """`tenant_share`: workers one tenant may hold at once (None: all of them). `landlock_mode`:
        auto, required or off (see landlock.py)."""
        if size < 1:
            raise ValueError("a sandbox pool needs at least one worker")
        if tenant_share is not None and tenant_share < 1:
            raise ValueError("a tenant's share of the sandbox pool must be at least one worker")
        self._size = size
        self._limits = limits
        self._config = orjson.dumps(
            {
                "cpu_seconds": limits.cpu_seconds,
                "memory_bytes": limits.memory_bytes,
                "wall_seconds": limits.wall_seconds,
                "read_allowlist": [os.path.abspath(p) for p in read_allowlist],
            }
        ).decode()
        self._env = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
        self._command = [sys.executable, "-m", WORKER_MODULE, self._config]
        # What the workers may open, for landlock.py (none: not confined).
        self.landlock_rules: dict[str, list[str]] = {}
        if landlock_mode != "off":
            self.landlock_rules = landlock.worker_rules(read_allowlist)
            self._command = landlock.launch(self.landlock_rules, landlock_mode, self._command)
        # The ABI the workers are confined with, or "0: why not" (from their first answer).
        self.landlock = "0: turned off" if landlock_mode == "off" else ""
        # Whether the workers' seccomp filter (no sockets, landlock.py) is on: "1", or "0: why not".
        self.seccomp = "0: turned off" if landlock_mode == "off" else ""
        self._idle: list[_Worker] = []  # least recently used first
        # Callers waiting for a worker, per tenant; a worker is handed to one of
        # them (its future resolved; None when the pool closes).
        self._waiting: FairQueue[_Worker | None] = FairQueue(min(tenant_share or size, size))
        self._spawning = 0  # replacement workers starting
        self._workers: set[_Worker] = set()  # in service: idle or running a job
        self._processes: set[_Worker] = set()  # every process not yet reaped
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self.stats = SandboxStats()

    @property
    def size(self) -> int:
        return self._size

    @property
    def tenant_share(self) -> int:
        """Workers one tenant may hold at once."""
        return self._waiting.cap

    def held(self, tenant: str) -> int:
        """Workers running `tenant`'s jobs now."""
        return self._waiting.held(tenant)

    @property
    def waiting(self) -> int:
        """Runs waiting for a worker."""
        return len(self._waiting)

    @property
    def busy(self) -> int:
        """Workers running a job now (in service and not idle)."""
        return len(self._workers) - len(self._idle)

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers in service (for tests and diagnostics)."""
        return sorted(w.pid for w in self._workers)

    async def start(self) -> None:
        """Spawn the workers and wait until each answers a ping."""
        if self._started:
            return
        self._started = True
        results = await asyncio.gather(*(self._spawn() for _ in range(self._size)), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self.close()
            raise failure
        for worker in results:
            assert isinstance(worker, _Worker)
            self._put_idle(worker)
        watchdog = asyncio.get_running_loop().create_task(self._watchdog())
        self._tasks.add(watchdog)
        watchdog.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop every worker and wait for it to exit."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        processes = list(self._processes)
        for worker in processes:
            worker.kill()
        await asyncio.gather(*(w.reap() for w in processes), return_exceptions=True)
        self._processes.clear()
        self._workers.clear()
        self._idle.clear()
        for waiter in self._waiting.drain():
            if not waiter.done():
                waiter.set_result(None)

    async def ping(self) -> None:
        """Health check: raises unless the pool runs and an idle worker (if any) answers.

        A worker that fails the ping is replaced and the ping tried once more:
        one worker being recycled (after a refused job, say) is not an
        unhealthy pool.
        """
        try:
            await self._ping_once()
        except SandboxCrashed:
            await self._ping_once()

    async def _ping_once(self) -> None:
        if not self._started or self._closed:
            raise SandboxError("sandbox pool is not running", reason="SANDBOX_UNAVAILABLE")
        if not self._idle:
            if not self._workers:
                raise SandboxCrashed("no sandbox worker is running")
            return  # all busy running jobs: alive
        worker = self._idle.pop()
        timer = asyncio.get_running_loop().call_later(PING_TIMEOUT, worker.expire)
        healthy = False
        try:
            await worker.call({"id": _new_job_id(), "op": "ping"})
            healthy = True
        except (_Lost, OSError, EOFError, orjson.JSONDecodeError) as exc:
            raise SandboxCrashed(f"sandbox worker {worker.pid} did not answer a ping") from exc
        finally:
            timer.cancel()
            self._release(worker, healthy)

    async def run(
        self,
        code: str,
        inputs: dict[str, Any],
        *,
        tenant: str,
        timeout: float | None = None,
    ) -> Any:
        """Run `code` with `inputs` as variables; the JSON value it assigned to `result` (None if none).

        `tenant` is whose code it is: it runs in a worker that has only ever
        run that tenant's code. `timeout` bounds the whole call, waiting for a
        free worker included; `limits.wall_seconds` bounds the run in the worker.
        """
        try:
            if not self._started or self._closed:
                raise SandboxError("sandbox pool is not running", reason="SANDBOX_UNAVAILABLE")
            try:
                inputs_json = orjson.Fragment(orjson.dumps(inputs, option=orjson.OPT_NON_STR_KEYS))
            except orjson.JSONEncodeError as exc:
                raise UserCodeError(f"inputs are not JSON-serializable: {exc}", reason="USER_CODE_INPUT") from None
            limit = wall = self._limits.wall_seconds
            if timeout is None:
                worker = await self._acquire(tenant)
            else:
                started = time.monotonic()
                worker = await self._acquire_within(tenant, timeout)
                limit = min(limit, timeout)
                wall = min(wall, timeout - (time.monotonic() - started))
                if wall <= 0:
                    self._release(worker, healthy=True)
                    raise SandboxTimeout(f"no time left to run the code ({timeout:g} s)", limit="wall", seconds=0)
            self.stats.jobs += 1
            return await self._run_on(worker, code, inputs_json, wall, limit)
        except SandboxError:
            self.stats.failures += 1
            raise

    async def _acquire(self, tenant: str) -> _Worker:
        """A worker for `tenant`, counted in its share: handed over by `_dispatch`, waiting if need be."""
        if self._closed:
            raise SandboxError("sandbox pool is not running", reason="SANDBOX_UNAVAILABLE")
        waiter: asyncio.Future[_Worker | None] = asyncio.get_running_loop().create_future()
        self._waiting.push(tenant, waiter)
        at_share = self._waiting.held(tenant) >= self._waiting.cap
        self._dispatch()
        if not waiter.done() and at_share:
            self.stats.share_waits += 1
        try:
            worker = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and (handed := waiter.result()) is not None:
                # Handed a worker just as the caller gave up: it goes back unused.
                self._release(handed, healthy=True)
            else:
                self._waiting.remove(tenant, waiter)
            raise
        if worker is None:
            raise SandboxError("sandbox pool is not running", reason="SANDBOX_UNAVAILABLE")
        return worker

    async def _acquire_within(self, tenant: str, seconds: float) -> _Worker:
        try:
            async with asyncio.timeout(max(seconds, 0.0)):
                return await self._acquire(tenant)
        except TimeoutError:
            raise SandboxTimeout(
                f"no sandbox worker became free within the {seconds:g} s timeout", limit="wall", seconds=seconds
            ) from None

    def _take(self, tenant: str) -> _Worker | None:
        """Remove and return an idle worker of `tenant` (most recently used), or a fresh one bound to it."""
        for index in range(len(self._idle) - 1, -1, -1):
            if self._idle[index].tenant == tenant:
                return self._idle.pop(index)
        for index, worker in enumerate(self._idle):
            if worker.tenant is None:
                worker.tenant = tenant
                return self._idle.pop(index)
        return None

    def _put_idle(self, worker: _Worker) -> None:
        worker.allow_cpu(IDLE_CPU)
        self._idle.append(worker)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand idle workers to waiting callers, one tenant at a time in turn, each within its share.

        A tenant whose turn it is but who finds only other tenants' idle
        workers gets a fresh one: the least recently used idle worker is
        killed and replaced for it, unless a fresh worker already starting
        is its. So its turn is kept (later tenants cannot take every worker
        that frees up while it waits), and a burst of one tenant does not
        kill more idle workers of the others than it can use.
        """
        if self._closed:
            return
        progressed = True
        while progressed:
            progressed = False
            coming = self._spawning  # fresh workers on their way, each for the first tenant without one
            for tenant in self._waiting.ready():
                worker = self._take(tenant)
                if worker is not None:
                    worker.held = True
                    self._waiting.pop(tenant).set_result(worker)
                    progressed = True
                    break  # the served tenant went to the back: start the round again
                if coming:
                    coming -= 1
                elif self._idle:
                    self.stats.tenant_switches += 1
                    self._retire(self._idle.pop(0))  # the least recently used
                else:
                    break  # nothing idle is left for anyone

    async def _run_on(self, worker: _Worker, code: str, inputs: orjson.Fragment, wall: float, limit: float) -> Any:
        """Run the job on `worker`, killing it after `wall` seconds (`limit` is the limit as configured)."""
        key = _code_key(code)
        worker.begin_job()
        # The worker's own timer reports the limit; the watchdog is the backstop.
        worker.allow_cpu(self._limits.cpu_seconds + CPU_GRACE)
        healthy = False
        timer = asyncio.get_running_loop().call_later(wall, worker.expire)
        try:
            reply = await worker.call(self._request(worker, key, code, inputs))
            if reply.get("status") == "missing":  # the worker evicted it: send the code again
                worker.known.pop(key, None)
                reply = await worker.call(self._request(worker, key, code, inputs))
            if reply.get("kind") != "syntax":
                worker.known[key] = None
                if len(worker.known) > CODE_CACHE_SIZE:
                    worker.known.popitem(last=False)
            timer.cancel()
            error = self._error(worker, reply)
            healthy = not (reply.get("retire") or worker.violations or worker.cpu_exceeded)
        except (_Lost, OSError, EOFError, orjson.JSONDecodeError) as exc:
            raise await self._failure(worker, limit, exc) from None
        finally:
            timer.cancel()
            self._release(worker, healthy)
        if error is not None:
            raise error
        return reply.get("result")

    def _request(self, worker: _Worker, key: str, code: str, inputs: orjson.Fragment) -> dict[str, Any]:
        if key in worker.known:
            worker.known.move_to_end(key)
            return {"id": _new_job_id(), "key": key, "code": None, "inputs": inputs}
        return {"id": _new_job_id(), "key": key, "code": code, "inputs": inputs}

    def _error(self, worker: _Worker, reply: dict[str, Any]) -> SandboxError | None:
        """What the job failed with, or None when it succeeded."""
        if worker.violations:  # first: a refusal may be why the code failed or stopped
            return SandboxPolicyViolation(worker.violations[0])
        if worker.cpu_exceeded:
            return self._cpu_timeout()
        if reply.get("status") == "ok":
            return None
        return self._reported(reply)

    def _reported(self, reply: dict[str, Any]) -> SandboxError:
        """The error a worker's error reply stands for."""
        kind, message = reply.get("kind"), str(reply.get("message", "the sandbox reported an error"))
        if kind in ("user", "syntax", "result"):
            reason = "USER_CODE_SYNTAX" if kind == "syntax" else None
            return UserCodeError(message, reason=reason, error_type=reply.get("type"), line=reply.get("line"))
        if kind == "policy":
            return SandboxPolicyViolation(message)
        if kind == "cpu":
            return self._cpu_timeout()
        if kind == "memory":
            return SandboxMemoryError(f"memory limit exceeded ({self._limits.memory_bytes // 2**20} MiB)")
        return SandboxCrashed(message)

    def _cpu_timeout(self) -> SandboxTimeout:
        seconds = self._limits.cpu_seconds
        return SandboxTimeout(f"CPU time limit exceeded ({seconds:g} s)", limit="cpu", seconds=seconds)

    async def _failure(self, worker: _Worker, limit: float, exc: Exception) -> SandboxError:
        """The error for a worker that stopped answering (it is being replaced)."""
        if worker.violations:
            return SandboxPolicyViolation(worker.violations[0])
        if worker.cpu_exceeded:
            return self._cpu_timeout()
        if self._closed:
            return SandboxError("the sandbox pool was closed while the code ran", reason="SANDBOX_UNAVAILABLE")
        if worker.expired:
            return SandboxTimeout(f"wall-clock time limit exceeded ({limit:g} s)", limit="wall", seconds=limit)
        if isinstance(exc, (_Lost, orjson.JSONDecodeError)):
            # It wrote something that is not a frame (user code can reach its fds).
            return SandboxCrashed(f"sandbox worker broke the protocol ({exc})")
        return await self._death(worker)

    async def _death(self, worker: _Worker) -> SandboxError:
        """The error for a worker that died by itself, from its exit status."""
        worker.kill()
        status = await worker.reap()
        if status == -signal.SIGXCPU:
            return self._cpu_timeout()  # the RLIMIT_CPU backstop
        detail = worker.last_stderr_line()
        detail = f": {detail}" if detail else ""
        if -status in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS):
            # Native code (orjson, say) that runs out of address space crashes
            # rather than raise MemoryError; running it again would too.
            name = signal.Signals(-status).name
            return SandboxMemoryError(f"sandbox worker was killed by {name}, most likely out of memory{detail}")
        how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        return SandboxCrashed(f"sandbox worker {how}{detail}")

    def _release(self, worker: _Worker, healthy: bool) -> None:
        """Back to the idle queue, or kill it and start a replacement; either way its tenant's share frees up."""
        if worker.held:
            worker.held = False
            assert worker.tenant is not None
            self._waiting.release(worker.tenant)
        if healthy and not self._closed and worker.process.returncode is None:
            self._put_idle(worker)
            return
        self._retire(worker)
        self._dispatch()

    def _retire(self, worker: _Worker) -> None:
        """Kill a worker taken out of service and start its replacement."""
        self._workers.discard(worker)
        worker.kill()
        if self._closed:
            return  # close() reaps it
        self.stats.workers_replaced += 1
        self._spawning += 1
        task = asyncio.get_running_loop().create_task(self._replace(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, old: _Worker) -> None:
        try:  # counted in _release, so callers deciding right now see it
            await self._respawn(old)
        finally:
            self._spawning -= 1

    async def _respawn(self, old: _Worker) -> None:
        await old.reap()
        self._processes.discard(old)
        for attempt in itertools.count():
            if self._closed:
                return
            try:
                worker = await self._spawn()
            except Exception as exc:  # noqa: BLE001 - whatever failed, the pool must get its worker back
                delay = RESPAWN_DELAYS[min(attempt, len(RESPAWN_DELAYS) - 1)]
                log.error("could not start a sandbox worker (retrying in %gs): %s", delay, exc)
                await asyncio.sleep(delay)
                continue
            if self._closed:  # closed while it started: close() may not have seen it
                self._workers.discard(worker)
                worker.kill()
                await worker.reap()
                return
            self._put_idle(worker)
            return

    async def _spawn(self) -> _Worker:
        try:
            process = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
                # Not the server's working directory: a json.py there must not
                # shadow the stdlib. A new session: Ctrl-C is the server's.
                cwd="/",
                start_new_session=True,
            )
        except OSError as exc:
            raise SandboxCrashed(f"cannot start a sandbox worker: {exc}") from exc
        worker = _Worker(process)
        self._processes.add(worker)
        timer = asyncio.get_running_loop().call_later(START_TIMEOUT, worker.expire)
        try:
            reply = await worker.call({"id": _new_job_id(), "op": "ping"})
            if reply.get("status") != "pong":
                raise _Lost("did not answer the ping")
            if self.landlock_rules:
                self.landlock = str(reply.get("landlock", ""))
                self.seccomp = str(reply.get("seccomp", ""))
        except (_Lost, OSError, EOFError, orjson.JSONDecodeError) as exc:
            worker.kill()
            status = await worker.reap()
            detail = worker.last_stderr_line() or (f"no answer within {START_TIMEOUT:g} s" if worker.expired else "")
            if self.landlock_rules and status != landlock.CONFINEMENT_FAILED:
                # A Python installation that reads files outside landlock.worker_rules() fails here.
                detail += " (if Landlock's confinement is at fault, --sandbox-landlock off starts it unconfined)"
            raise SandboxCrashed(f"sandbox worker failed to start (status {status}): {detail}") from exc
        except BaseException:
            worker.kill()
            raise
        finally:
            timer.cancel()
        self._workers.add(worker)
        watcher = asyncio.get_running_loop().create_task(self._watch(worker))
        self._tasks.add(watcher)
        watcher.add_done_callback(self._tasks.discard)
        return worker

    async def _watchdog(self) -> None:
        """Kill workers past their CPU allowance: busy ones fail their job with the CPU limit."""
        while not self._closed:
            await asyncio.sleep(WATCH_INTERVAL)
            for worker in list(self._workers):
                if not worker.killed and worker.over_cpu():
                    log.warning("sandbox worker %d went past its CPU allowance: killed", worker.pid)
                    worker.cpu_exceeded = True
                    worker.kill()

    async def _watch(self, worker: _Worker) -> None:
        """Replace a worker that dies while idle (killed by its idle CPU limit, say).

        A worker that dies during a job is the job's to report.
        """
        await worker.process.wait()
        if worker in self._idle:
            self._idle.remove(worker)
            self._release(worker, healthy=False)
