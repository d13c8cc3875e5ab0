"""The sandbox pool: user code runs in warm worker processes and cannot reach files, network or processes.

Each refused or failing run is followed by a normal run on the same pool, which
must succeed: the pool replaces whatever worker the failure left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import tempfile
import time
import types
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio

from flowport.server.nodes.base import NodeContext, NodeServices
from flowport.server.nodes.python_code import PythonCodeNode
from flowport.server.nodes.substitution import Parameters, execution_variables
from flowport.server.sandbox import (
    SandboxCrashed,
    SandboxError,
    SandboxLimits,
    SandboxMemoryError,
    SandboxPolicyViolation,
    SandboxPool,
    SandboxTimeout,
    UserCodeError,
    policy,
)

module_loop = pytest.mark.asyncio(loop_scope="module")
TENANT = "acme"

# Reaches os.system without importing anything: a class defined in the os
# module, found through object's subclasses, has os's globals.
SUBCLASS_ESCAPE = """
wrap = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]
wrap.__init__.__globals__['system']('true')
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[SandboxPool]:
    sandbox = SandboxPool(size=2, limits=SandboxLimits(cpu_seconds=1.0, wall_seconds=20.0))
    await sandbox.start()
    yield sandbox
    await sandbox.close()


async def still_works(pool: SandboxPool) -> None:
    assert await pool.run("result = n * 2", {"n": 21}, tenant=TENANT) == 42


async def eventually(check: Callable[[], bool], within: float = 10.0) -> bool:
    """Whether `check()` holds within `within` seconds (polled while the loop runs)."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def process_gone(pid: int, within: float = 10.0) -> bool:
    """Whether `pid` has exited and been reaped (polls: reaping runs in the background)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


@module_loop
async def test_inputs_are_variables_and_result_is_returned(pool: SandboxPool) -> None:
    code = "result = {'processed': len(data), 'timestamp': datetime.now().isoformat(), 'as_json': json.dumps(data)}"
    result = await pool.run(code, {"data": [1, 2, 3]}, tenant=TENANT)
    assert result["processed"] == 3
    assert result["as_json"] == "[1, 2, 3]"
    assert isinstance(result["timestamp"], str) and "T" in result["timestamp"]
    assert await pool.run("x = 1", {}, tenant=TENANT) is None  # no `result`: None
    code = "import math, re\nresult = [math.sqrt(n), re.sub('a', 'b', s), name.upper(), flag, nested['k']]"
    assert await pool.run(
        code, {"n": 16, "s": "aa", "name": "ada", "flag": True, "nested": {"k": None}}, tenant=TENANT
    ) == [
        4.0,
        "bb",
        "ADA",
        True,
        None,
    ]


@module_loop
async def test_a_code_nodes_tenant_id_is_the_executions_whatever_its_inputs_say(pool: SandboxPool) -> None:
    ctx = NodeContext(TENANT, "e-1", "c", 1, 20.0, NodeServices(sandbox=pool))
    node = PythonCodeNode()
    code = "result = {'t': tenant_id, 's': session_id, 'e': execution_id, 'w': workflow_id, 'n': n}"
    posing = Parameters(
        {"tenant_id": "evil", "session_id": "s-evil", "n": 1}, execution_variables(TENANT, "s-1", "e-1", "wf")
    )
    outputs = await node.run(ctx, node.prepare({"code": code}), posing)
    assert outputs == {"result": {"t": TENANT, "s": "s-1", "e": "e-1", "w": "wf", "n": 1}}


@module_loop
async def test_iso_strings_in_inputs_have_isoformat_and_stay_strings(pool: SandboxPool) -> None:
    # The Kailash example's code for SQL rows: row['created_at'].isoformat() on a driver's datetime.
    code = """
records = [{'id': row['id'], 'created_at': row['created_at'].isoformat()} for row in db_results]
result = {
    'records': records,
    'plain': db_results[0]['created_at'] + '!',
    'same': db_results[0]['created_at'] == '2024-01-02T03:04:05.123456+00:00',
    'minutes': db_results[1]['created_at'].isoformat(timespec='minutes'),
    'name_has_no_isoformat': hasattr(db_results[0]['name'], 'isoformat'),
}
"""
    rows = [
        {"id": 1, "name": "2024-01-02 but not a date", "created_at": "2024-01-02T03:04:05.123456+00:00"},
        {"id": 2, "name": "b", "created_at": "2024-01-03 10:20:30"},
    ]
    assert await pool.run(code, {"db_results": rows}, tenant=TENANT) == {
        "records": [
            {"id": 1, "created_at": "2024-01-02T03:04:05.123456+00:00"},
            {"id": 2, "created_at": "2024-01-03T10:20:30"},
        ],
        "plain": "2024-01-02T03:04:05.123456+00:00!",
        "same": True,
        "minutes": "2024-01-03T10:20",
        "name_has_no_isoformat": False,
    }


@module_loop
async def test_dates_are_serialized_as_iso_strings_and_common_stdlib_works(pool: SandboxPool) -> None:
    code = """
from collections import namedtuple
from zoneinfo import ZoneInfo
import dataclasses, decimal, statistics, time
P = namedtuple('P', 'x y')
@dataclasses.dataclass
class Item:
    n: int
print('print output is discarded, not sent on the protocol channel')
result = {
    'date': date(2024, 1, 2),
    'parsed': datetime.strptime('2024-01-02', '%Y-%m-%d'),
    'parsed_time': list(time.strptime('2024', '%Y'))[0],
    'zone': datetime(2024, 1, 2, tzinfo=ZoneInfo('Europe/Paris')).isoformat(),
    'point': P(1, 2),
    'item': dataclasses.asdict(Item(3)),
    'mean': statistics.mean([1, 2, 3]),
    'decimal': str(decimal.Decimal('1.10') * 2),
    'later': (date(2024, 1, 2) + timedelta(days=1)).isoformat(),
}
"""
    assert await pool.run(code, {}, tenant=TENANT) == {
        "date": "2024-01-02",
        "parsed": "2024-01-02T00:00:00",
        "parsed_time": 2024,
        "zone": "2024-01-02T00:00:00+01:00",
        "point": [1, 2],
        "item": {"n": 3},
        "mean": 2,
        "decimal": "2.20",
        "later": "2024-01-03",
    }


@module_loop
async def test_reading_etc_passwd_is_refused(pool: SandboxPool) -> None:
    with pytest.raises(SandboxPolicyViolation) as caught:
        await pool.run("result = open('/etc/passwd').read()", {}, tenant=TENANT)
    assert str(caught.value) == "file access refused: open('/etc/passwd', 'r')"
    assert caught.value.reason == "SANDBOX_POLICY"
    # The real open, reached around the safe builtins, meets the audit hook.
    with pytest.raises(SandboxPolicyViolation, match="file access refused: open"):
        await pool.run("result = json.__builtins__['open']('/etc/passwd').read()", {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_writing_a_file_is_refused(pool: SandboxPool, tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with pytest.raises(SandboxPolicyViolation, match=r"file access refused: open\(.*out\.txt', 'w'\)"):
        await pool.run("open(path, 'w').write('x')", {"path": str(target)}, tenant=TENANT)
    with pytest.raises(SandboxPolicyViolation, match="file access refused"):
        await pool.run("json.__builtins__['open'](path, 'a').write('x')", {"path": str(target)}, tenant=TENANT)
    assert not target.exists()
    await still_works(pool)


@module_loop
async def test_network_is_refused(pool: SandboxPool) -> None:
    with pytest.raises(SandboxPolicyViolation, match="import of 'socket' is not allowed"):
        await pool.run("import socket\nsocket.create_connection(('127.0.0.1', 80))", {}, tenant=TENANT)
    # With the real __import__ the module still cannot be loaded: the hook refuses new imports.
    escape = "s = json.__builtins__['__import__']('socket')\ns.create_connection(('127.0.0.1', 80))"
    with pytest.raises(SandboxPolicyViolation, match="import of 'socket' is not allowed"):
        await pool.run(escape, {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_processes_are_refused(pool: SandboxPool) -> None:
    with pytest.raises(SandboxPolicyViolation, match="import of 'subprocess' is not allowed"):
        await pool.run("import subprocess\nsubprocess.run(['true'])", {}, tenant=TENANT)
    with pytest.raises(SandboxPolicyViolation) as caught:
        await pool.run(SUBCLASS_ESCAPE, {}, tenant=TENANT)
    assert str(caught.value) == "subprocess refused (os.system)"
    await still_works(pool)


@module_loop
async def test_ctypes_is_refused(pool: SandboxPool) -> None:
    with pytest.raises(SandboxPolicyViolation) as caught:
        await pool.run("import ctypes", {}, tenant=TENANT)
    assert str(caught.value) == "import of 'ctypes' is not allowed (line 1)"
    with pytest.raises(SandboxPolicyViolation, match="import of 'ctypes' is not allowed"):
        await pool.run("json.__builtins__['__import__']('ctypes')", {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_catching_the_refusal_does_not_hide_it(pool: SandboxPool) -> None:
    code = "try:\n    open('/etc/passwd')\nexcept BaseException:\n    pass\nresult = 'swallowed'"
    with pytest.raises(SandboxPolicyViolation, match="/etc/passwd"):
        await pool.run(code, {}, tenant=TENANT)
    code = "try:\n" + "".join(f"    {line}\n" for line in SUBCLASS_ESCAPE.strip().splitlines())
    code += "except BaseException:\n    pass\nresult = 'swallowed'"
    with pytest.raises(SandboxPolicyViolation, match=r"os\.system"):
        await pool.run(code, {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_an_optional_import_may_fall_back(pool: SandboxPool) -> None:
    code = "try:\n    import numpy\nexcept ImportError:\n    numpy = None\nresult = numpy is None"
    assert await pool.run(code, {}, tenant=TENANT) is True


@module_loop
async def test_infinite_loop_hits_the_cpu_limit(pool: SandboxPool) -> None:
    with pytest.raises(SandboxTimeout) as caught:
        await pool.run("while True: pass", {}, tenant=TENANT)
    assert caught.value.limit == "cpu"
    assert caught.value.reason == "SANDBOX_TIMEOUT"
    assert str(caught.value) == "CPU time limit exceeded (1 s)"
    # Catching the limit's exception does not escape it.
    code = "while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass"
    with pytest.raises(SandboxTimeout):
        await pool.run(code, {}, timeout=2, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_wall_clock_limit_kills_a_sleeping_job(pool: SandboxPool) -> None:
    with pytest.raises(SandboxTimeout) as caught:
        await pool.run("import time\ntime.sleep(30)", {}, timeout=0.3, tenant=TENANT)
    assert caught.value.limit == "wall"
    assert "wall-clock time limit exceeded (0.3 s)" in str(caught.value)
    with pytest.raises(SandboxTimeout):
        await pool.run("result = 1", {}, timeout=0, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_allocating_2_gib_hits_the_memory_limit(pool: SandboxPool) -> None:
    with pytest.raises(SandboxMemoryError) as caught:
        await pool.run("x = bytearray(2 * 1024**3)", {}, tenant=TENANT)
    assert caught.value.reason == "SANDBOX_MEMORY"
    assert "512 MiB" in str(caught.value)
    await still_works(pool)


@module_loop
async def test_user_exception_names_type_message_and_line(pool: SandboxPool) -> None:
    with pytest.raises(UserCodeError) as caught:
        await pool.run("a = 1\nb = 0\nc = a / b\n", {}, tenant=TENANT)
    assert str(caught.value) == "ZeroDivisionError: division by zero (line 3)"
    assert (caught.value.reason, caught.value.error_type, caught.value.line) == (
        "USER_CODE_ERROR",
        "ZeroDivisionError",
        3,
    )
    with pytest.raises(UserCodeError, match=r"KeyError: 'x' \(line 2\)"):
        await pool.run("def f(d):\n    return d['x']\nf({})", {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_syntax_error(pool: SandboxPool) -> None:
    with pytest.raises(UserCodeError) as caught:
        await pool.run("x = 1\ndef f(:\n", {}, tenant=TENANT)
    assert caught.value.reason == "USER_CODE_SYNTAX"
    assert str(caught.value).startswith("SyntaxError: ")
    assert caught.value.line == 2
    await still_works(pool)


@module_loop
async def test_non_serializable_result(pool: SandboxPool) -> None:
    with pytest.raises(UserCodeError) as caught:
        await pool.run("result = {'s': {1, 2}}", {}, tenant=TENANT)
    assert str(caught.value) == "result is not JSON-serializable: type 'set'"
    with pytest.raises(UserCodeError, match="type 'Thing'"):
        await pool.run("class Thing: pass\nresult = [Thing()]", {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_non_serializable_inputs_are_refused_before_any_worker(pool: SandboxPool) -> None:
    with pytest.raises(UserCodeError) as caught:
        await pool.run("result = 1", {"x": object()}, tenant=TENANT)
    assert caught.value.reason == "USER_CODE_INPUT"


@module_loop
async def test_a_dying_worker_is_replaced(pool: SandboxPool) -> None:
    escape = SUBCLASS_ESCAPE.replace("['system']('true')", "['_exit'](3)")
    with pytest.raises(SandboxCrashed, match="exited with status 3"):
        await pool.run(escape, {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_user_code_cannot_write_to_the_worker_pipes(pool: SandboxPool) -> None:
    # fd 4 is the worker's protocol output: a frame written there could pass
    # for the reply to a job. Raw descriptor I/O is gone from os...
    escape = SUBCLASS_ESCAPE.replace("['system']('true')", "['write'](4, b'\\x00\\x00\\x00\\x02{}')")
    with pytest.raises(UserCodeError, match="KeyError: 'write'"):
        await pool.run(escape, {}, tenant=TENANT)
    # ...the open() of user code takes paths only...
    with pytest.raises(UserCodeError, match="not int"):
        await pool.run("open(4, 'wb')", {}, tenant=TENANT)
    # ...and the real one, reached all the same, is refused by the hook.
    with pytest.raises(SandboxPolicyViolation, match=r"file access refused: open\(4,"):
        await pool.run("json.__builtins__['open'](4, 'wb')", {}, tenant=TENANT)
    await still_works(pool)


# Inside its worker, user code can reach everything of the worker (here its
# pipe-writing function, through a class found in object's subclasses). The
# server treats the worker as untrusted, which is what these tests check.
RAW_WRITE = "W = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_Runner'][0]"
RAW_WRITE += ".__init__.__globals__['_WRITE']\n"


@module_loop
async def test_a_frame_longer_than_any_reply_is_refused_unread(pool: SandboxPool) -> None:
    code = RAW_WRITE + "W(4, (256 * 2**20).to_bytes(4, 'big') + b'[0,0,0')\nimport time\ntime.sleep(5)"
    with pytest.raises(SandboxCrashed, match=r"broke the protocol \(sent a frame of 268435456 bytes\)"):
        await pool.run(code, {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_a_forged_reply_for_another_job_ends_the_worker(pool: SandboxPool) -> None:
    code = RAW_WRITE + "import json as j\np = j.dumps({'id': 1, 'status': 'ok', 'result': 'forged'}).encode()\n"
    code += "W(4, len(p).to_bytes(4, 'big') + p)\nimport time\ntime.sleep(5)"
    with pytest.raises(SandboxCrashed, match="answered for another job"):
        await pool.run(code, {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_the_first_refusal_ends_the_job_however_many_follow(pool: SandboxPool) -> None:
    # Each refusal is a notice on the pipe; the server reads one, not millions.
    code = """
try:
    1 / 0
except ZeroDivisionError as exc:
    tb = exc.__traceback__
while True:
    try:
        tb.tb_frame
    except PermissionError:
        pass
"""
    with pytest.raises(SandboxPolicyViolation, match="frame introspection refused"):
        await pool.run(code, {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_code_that_swallows_its_cpu_limit_is_stopped_by_the_server() -> None:
    sandbox = SandboxPool(size=1, limits=SandboxLimits(cpu_seconds=0.5, wall_seconds=30.0))
    await sandbox.start()
    try:
        code = "while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass"
        with pytest.raises(SandboxTimeout, match="CPU time limit exceeded") as caught:
            await sandbox.run(code, {}, tenant=TENANT)
        assert caught.value.limit == "cpu"
        await still_works(sandbox)
    finally:
        await sandbox.close()


@module_loop
async def test_a_worker_that_answers_early_and_keeps_running_is_killed_while_idle() -> None:
    sandbox = SandboxPool(size=1, limits=SandboxLimits(cpu_seconds=1.0, wall_seconds=30.0))
    await sandbox.start()
    try:
        # Patch the worker so the code can answer its own job, then burn CPU
        # with the server believing the worker idle.
        patch = (
            "import typing\nR = [c for c in object.__subclasses__() if c.__name__ == '_Runner'][0]\n"
            "orig = R.handle\ndef handle(self, request, _orig=orig, _stash=typing):\n"
            "    _stash.request = request\n    return _orig(self, request)\nR.handle = handle\nresult = 1"
        )
        await sandbox.run(patch, {}, tenant=TENANT)
        burn = RAW_WRITE + (
            "import typing\np = typing.sys.modules['orjson'].dumps({'id': typing.request['id'], 'status': 'ok'})\n"
            "W(4, len(p).to_bytes(4, 'big') + p)\n"
            "while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass"
        )
        assert await sandbox.run(burn, {}, tenant=TENANT) is None  # the forged answer
        (burner,) = sandbox.pids
        for _ in range(200):  # the watchdog runs on this event loop: wait without blocking it
            if burner not in sandbox.pids:
                break
            await asyncio.sleep(0.1)
        assert burner not in sandbox.pids, "an idle worker burning CPU must be killed"
        assert process_gone(burner)
        await still_works(sandbox)
    finally:
        await sandbox.close()


@module_loop
async def test_a_stderr_flood_is_cut_off(pool: SandboxPool) -> None:
    code = "import typing\nerr = typing.sys.stderr\nwhile True:\n    err.write('x' * 65536)\n    err.flush()"
    with pytest.raises(UserCodeError, match="BrokenPipeError"):
        await pool.run(code, {}, tenant=TENANT)
    await still_works(pool)


# Each walks from a frame of user code up into the worker's job loop, where
# the pipes, the runner and the next job's request are.
FRAME_WALKS = {
    "tb_frame": "try:\n    1 / 0\nexcept ZeroDivisionError as exc:\n    result = exc.__traceback__.tb_frame.f_back",
    "gi_frame": "def walk():\n    yield g.gi_frame.f_back\ng = walk()\nresult = next(g)",
    "cr_frame": "async def co():\n    pass\nc = co()\nresult = c.cr_frame\nc.close()",
}


@module_loop
@pytest.mark.parametrize("attribute", sorted(FRAME_WALKS))
async def test_frames_are_not_handed_to_user_code(pool: SandboxPool, attribute: str) -> None:
    with pytest.raises(SandboxPolicyViolation, match=rf"frame introspection refused \({attribute}\)"):
        await pool.run(FRAME_WALKS[attribute], {}, tenant=TENANT)
    await still_works(pool)


@module_loop
async def test_getframe_fails_as_on_a_shallow_stack_and_the_stdlib_copes(pool: SandboxPool) -> None:
    with pytest.raises(UserCodeError, match="ValueError: frames are not available in the sandbox"):
        await pool.run("import typing\ntyping.sys._getframe(0)", {}, tenant=TENANT)
    # namedtuple, typing and enum ask for their caller's frame and fall back.
    code = """
import collections, enum, typing
Point = collections.namedtuple("Point", "x y")
Pair = typing.NamedTuple("Pair", [("a", int)])
T = typing.TypeVar("T")
Color = enum.Enum("Color", "RED GREEN")
result = [Point(1, 2).x, Pair(3).a, T.__name__, Color.GREEN.value]
"""
    assert await pool.run(code, {}, tenant=TENANT) == [1, 3, "T", 2]


@module_loop
async def test_the_worker_leaves_nothing_of_itself_in_sys_modules(pool: SandboxPool) -> None:
    code = "import typing\nresult = sorted(m for m in typing.sys.modules if m.split('.')[0] == 'flowport')"
    assert await pool.run(code, {}, tenant=TENANT) == []


@module_loop
async def test_a_worker_never_runs_two_tenants_code() -> None:
    # Whatever one tenant's code leaves in a worker (here a patched stdlib
    # function) must not exist for the next tenant: it gets another process.
    sandbox = SandboxPool(size=1)
    await sandbox.start()
    try:
        getpid = "__import__('typing').sys.modules['os'].getpid()"
        patch = f"json.dumps = lambda *a, **k: 'stolen'\nresult = {getpid}"
        probe = f"result = [json.dumps(1), {getpid}]"
        first_pid = await sandbox.run(patch, {}, tenant="tenant-a")
        # Same tenant: the same warm worker, patch included.
        assert await sandbox.run(probe, {}, tenant="tenant-a") == ["stolen", first_pid]
        assert sandbox.stats.tenant_switches == 0
        dumped, second_pid = await sandbox.run(probe, {}, tenant="tenant-b")
        assert (dumped, sandbox.stats.tenant_switches) == ("1", 1)
        assert second_pid != first_pid
        # And back: tenant A does not get B's worker either.
        assert (await sandbox.run(probe, {}, tenant="tenant-a"))[1] not in (first_pid, second_pid)
    finally:
        await sandbox.close()


@module_loop
async def test_every_tenant_waiting_for_a_worker_gets_one() -> None:
    sandbox = SandboxPool(size=2)
    await sandbox.start()
    try:
        await asyncio.gather(*(sandbox.run("result = 1", {}, tenant="a") for _ in range(2)))
        # b, c, b at once: both of a's idle workers go; whichever of b and c
        # gets the fresh ones first, the other still gets one in the end.
        jobs = (sandbox.run("result = t", {"t": t}, tenant=t, timeout=60) for t in ("b", "c", "b", "c", "b"))
        assert await asyncio.gather(*jobs) == ["b", "c", "b", "c", "b"]
        assert sandbox.stats.tenant_switches >= 2
        # A worker killed for a waiter that was served meanwhile is still being replaced.
        assert await eventually(lambda: len(sandbox.pids) == 2), "a worker was lost"
        # A burst of one tenant takes the idle workers of others, one per waiter.
        burst = await asyncio.gather(*(sandbox.run("result = 1", {}, tenant="d", timeout=60) for _ in range(8)))
        assert burst == [1] * 8
    finally:
        await sandbox.close()


@module_loop
async def test_server_environment_is_not_passed_to_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWPORT_TEST_SECRET", "hunter2")
    sandbox = SandboxPool(size=1)
    await sandbox.start()
    try:
        escape = SUBCLASS_ESCAPE.replace("wrap.__init__.__globals__['system']('true')", "")
        environ = await sandbox.run(escape + "result = dict(wrap.__init__.__globals__['environ'])", {}, tenant=TENANT)
    finally:
        await sandbox.close()
    assert "FLOWPORT_TEST_SECRET" not in environ


@module_loop
async def test_concurrent_runs_on_two_workers(pool: SandboxPool) -> None:
    code = "import hashlib\nresult = [n, hashlib.sha256(str(n).encode()).hexdigest()[:8]]"
    results = await asyncio.gather(*(pool.run(code, {"n": n}, tenant=TENANT) for n in range(40)))
    assert [r[0] for r in results] == list(range(40))
    assert len({r[1] for r in results}) == 40


@module_loop
async def test_code_is_sent_once_and_resent_when_the_worker_lost_it() -> None:
    sandbox = SandboxPool(size=1)
    await sandbox.start()
    try:
        worker = next(iter(sandbox._workers))
        assert await sandbox.run("result = n + 1", {"n": 1}, tenant=TENANT) == 2
        assert await sandbox.run("result = n + 1", {"n": 2}, tenant=TENANT) == 3
        assert len(worker.known) == 1
        # Pretend the worker has code it never saw (as after an eviction):
        # it answers "missing" and the pool sends the code.
        code = "result = 'resent'"
        worker.known[hashlib.sha256(code.encode()).hexdigest()] = None
        assert await sandbox.run(code, {}, tenant=TENANT) == "resent"
        assert sandbox.stats.workers_replaced == 0
    finally:
        await sandbox.close()


@module_loop
async def test_cancelling_a_run_kills_and_replaces_its_worker() -> None:
    sandbox = SandboxPool(size=1, limits=SandboxLimits(cpu_seconds=60, wall_seconds=60))
    await sandbox.start()
    try:
        (busy,) = sandbox.pids
        task = asyncio.create_task(sandbox.run("while True: pass", {}, tenant=TENANT))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert process_gone(busy)
        await still_works(sandbox)
        assert sandbox.pids != [busy]
        assert sandbox.stats.workers_replaced == 1
    finally:
        await sandbox.close()


@module_loop
async def test_close_leaves_no_worker_alive() -> None:
    sandbox = SandboxPool(size=2)
    await sandbox.start()
    await still_works(sandbox)
    await sandbox.ping()
    pids = sandbox.pids
    assert len(pids) == 2
    await sandbox.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(SandboxError, match="not running"):
        await sandbox.run("result = 1", {}, tenant=TENANT)


@pytest.fixture
def readable_dir() -> Iterator[Path]:
    """A temporary directory anyone can read: as root, the workers run as nobody."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@module_loop
async def test_close_fails_running_and_waiting_runs() -> None:
    sandbox = SandboxPool(size=1)
    await sandbox.start()
    running = asyncio.create_task(sandbox.run("import time\ntime.sleep(30)", {}, tenant=TENANT))
    waiting = asyncio.create_task(sandbox.run("result = 1", {}, tenant=TENANT))
    await asyncio.sleep(0.2)
    await sandbox.close()
    for task in (running, waiting):
        with pytest.raises(SandboxError) as caught:
            await task
        assert caught.value.reason == "SANDBOX_UNAVAILABLE"


@module_loop
@pytest.mark.skipif(os.geteuid() != 0, reason="workers change user only when the server is root")
async def test_workers_of_a_root_server_run_as_nobody(pool: SandboxPool) -> None:
    escape = SUBCLASS_ESCAPE.replace("wrap.__init__.__globals__['system']('true')", "")
    assert await pool.run(
        escape + "g = wrap.__init__.__globals__\nresult = [g['getuid'](), g['getgid']()]", {}, tenant=TENANT
    ) == [
        65534,
        65534,
    ]


@module_loop
async def test_read_allowlist(readable_dir: Path) -> None:
    allowed = readable_dir / "allowed"
    allowed.mkdir()
    (allowed / "data.txt").write_text("hello")
    (readable_dir / "secret.txt").write_text("no")
    (allowed / "link.txt").symlink_to(readable_dir / "secret.txt")
    sandbox = SandboxPool(size=1, read_allowlist=[str(allowed)])
    await sandbox.start()
    try:
        assert await sandbox.run("result = open(p).read()", {"p": str(allowed / "data.txt")}, tenant=TENANT) == "hello"
        for path in (readable_dir / "secret.txt", allowed / "link.txt", allowed / ".." / "secret.txt"):
            with pytest.raises(SandboxPolicyViolation, match="file access refused"):
                await sandbox.run("result = open(p).read()", {"p": str(path)}, tenant=TENANT)
        with pytest.raises(SandboxPolicyViolation, match="file access refused"):
            await sandbox.run("open(p, 'w')", {"p": str(allowed / "data.txt")}, tenant=TENANT)
        assert (allowed / "data.txt").read_text() == "hello"
    finally:
        await sandbox.close()


# The audit hook's decisions, checked in this process without installing it.


@pytest.fixture
def hook_and_reports(tmp_path: Path) -> Iterator[tuple[policy.AuditHook, int]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    yield policy.make_hook(internal_roots=[str(tmp_path)], report_fd=write_end), read_end
    os.close(read_end)
    os.close(write_end)


def reports(read_end: int) -> list[str]:
    try:
        data = os.read(read_end, 1 << 16)
    except BlockingIOError:
        return []
    found = []
    while data:
        size = int.from_bytes(data[:4], "big")
        found.append(orjson.loads(data[4 : 4 + size])["violation"])
        data = data[4 + size :]
    return found


def test_hook_refuses_and_reports(hook_and_reports: tuple[policy.AuditHook, int], tmp_path: Path) -> None:
    hook, read_end = hook_and_reports
    refused = {
        "socket.connect": ((None, ("127.0.0.1", 80)), "network access refused (socket.connect)"),
        "socket.__new__": ((None, 2, 1, 0), "network access refused (socket.__new__)"),
        "subprocess.Popen": (("true", ["true"], None, None), "subprocess refused (subprocess.Popen)"),
        "os.posix_spawn": (("true", [], {}), "subprocess refused (os.posix_spawn)"),
        "os.kill": ((1, 9), "signalling processes refused (os.kill)"),
        "ctypes.dlopen": (("libc.so.6",), "native code access refused (ctypes.dlopen)"),
        "resource.setrlimit": ((9, (1, 1)), "resource limit change refused (resource.setrlimit)"),
        "os.remove": (("/srv/x", -1), "file system access refused (os.remove)"),
        "sys.addaudithook": ((), "interpreter access refused (sys.addaudithook)"),
        "code.__new__": ((None,) * 6, "interpreter access refused (code.__new__)"),
        "something.new": ((), "operation refused (something.new)"),
    }
    for event, (args, message) in refused.items():
        with pytest.raises(PermissionError, match=re.escape(message)):
            hook(event, args)
        assert reports(read_end) == [message]
    with pytest.raises(PermissionError):
        hook("open", ("/etc/passwd", "r", os.O_RDONLY))
    with pytest.raises(PermissionError):
        hook("open", (str(tmp_path / "new.txt"), "w", os.O_WRONLY | os.O_CREAT))
    with pytest.raises(PermissionError):
        hook("open", (3, "r", os.O_RDONLY))  # file descriptors
    assert reports(read_end) == [
        "file access refused: open('/etc/passwd', 'r')",
        f"file access refused: open('{tmp_path / 'new.txt'}', 'w')",
        "file access refused: open(3, 'r')",
    ]


def test_hook_allows_reads_inside_its_roots_only(
    hook_and_reports: tuple[policy.AuditHook, int], tmp_path: Path
) -> None:
    hook, read_end = hook_and_reports
    (tmp_path / "inside.txt").write_text("x")
    (tmp_path / "escape").symlink_to("/etc")
    hook("open", (str(tmp_path / "inside.txt"), "r", os.O_RDONLY))
    hook("open", (os.fsencode(tmp_path / "inside.txt"), "r", os.O_RDONLY))
    hook("os.listdir", (str(tmp_path),))
    hook("exec", (compile("1", "<x>", "eval"),))
    for path in (tmp_path / "escape" / "passwd", f"{tmp_path}/../{tmp_path.name}x/a", "/etc/passwd"):
        with pytest.raises(PermissionError):
            hook("open", (str(path), "r", os.O_RDONLY))
    assert len(reports(read_end)) == 3
    # Imports are refused as ImportError and not reported (optional imports fall back).
    with pytest.raises(ImportError, match="import of 'ctypes' is not allowed"):
        hook("import", ("ctypes", None, [], [], []))
    assert reports(read_end) == []


def test_hook_frame_holds_no_python_functions(hook_and_reports: tuple[policy.AuditHook, int]) -> None:
    # User code sees the hook's frame in the traceback of the refusal; a Python
    # function there could be rewritten (__code__, closure cells) to disarm it.
    hook, _ = hook_and_reports
    try:
        hook("socket.connect", (None, ("127.0.0.1", 80)))
    except PermissionError as exc:
        tb = exc.__traceback__
        assert tb is not None
        while tb.tb_next is not None:
            tb = tb.tb_next
        assert tb.tb_frame.f_code.co_name == "hook"
        values = tb.tb_frame.f_locals.values()
        assert not [v for v in values if isinstance(v, types.FunctionType | types.MethodType)]
    else:
        pytest.fail("not refused")


def test_import_allowlist() -> None:
    assert policy.import_allowed("json") and policy.import_allowed("collections.abc")
    assert not policy.import_allowed("os") and not policy.import_allowed("jsonschema")
    importer = policy.make_importer(__import__)
    assert importer("math").sqrt(4) == 2
    with pytest.raises(ImportError, match="import of 'os' is not allowed"):
        importer("os")
    builtins = policy.safe_builtins()
    assert not {"exec", "eval", "compile", "input", "breakpoint", "globals", "vars"} & set(builtins)
