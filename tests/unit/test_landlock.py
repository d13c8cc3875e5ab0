"""Landlock beneath the audit hook: what the kernel itself refuses a sandbox worker.

The probes run as plain Python through landlock.py, with no audit hook, as
code that escaped the hook would: whatever they reach here, such code could.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from flowport.server.app import _report_confinement
from flowport.server.sandbox import SandboxCrashed, SandboxPool, landlock
from flowport.server.settings import Settings

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
ABI = landlock.abi()
needs_landlock = pytest.mark.skipif(ABI == 0, reason="this kernel offers no Landlock")

PROBE = """
import json, os, socket, sys
secret, folder, pid, port, abstract, udp_port, unix_path = sys.argv[1:]
def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as exc:
        return f"refused {exc.errno}"
def tcp():
    socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
def unix():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("\\0" + abstract)
def udp():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"escaped", ("127.0.0.1", int(udp_port)))
def by_path():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(unix_path)
print(json.dumps({
    "secret": attempt(lambda: open(secret).read()),
    "server environ": attempt(lambda: open(f"/proc/{pid}/environ", "rb").read()),
    "listing": attempt(lambda: os.listdir(folder)),
    "write": attempt(lambda: open(os.path.join(folder, "new"), "w").close()),
    "remove": attempt(lambda: os.unlink(secret)),
    "signal": attempt(lambda: os.kill(int(pid), 0)),
    "tcp": attempt(tcp),
    "abstract unix": attempt(unix),
    "udp": attempt(udp),
    "unix path": attempt(by_path),
    "stdlib": attempt(lambda: open(os.__file__).read()),
    "dev null": attempt(lambda: open(os.devnull, "w").write("x")),
    "abi": os.environ.get("FLOWPORT_WORKER_LANDLOCK"),
    "seccomp": os.environ.get("FLOWPORT_WORKER_SECCOMP"),
}))
"""


def _probe(tmp_path: Path, mode: str) -> dict[str, Any]:
    """What PROBE was allowed, run through landlock.py in `mode` with a worker's rules."""
    secret = tmp_path / "flowport.db"
    secret.write_text("every tenant's rows")
    abstract = f"flowport-test-{os.getpid()}"
    unix_path = tmp_path / "server.sock"
    with (
        socket.create_server(("127.0.0.1", 0)) as listener,
        socket.socket(socket.AF_UNIX) as unix,
        socket.socket(socket.AF_UNIX) as by_path,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
    ):
        unix.bind("\0" + abstract)
        unix.listen()
        by_path.bind(str(unix_path))
        by_path.listen()
        udp.bind(("127.0.0.1", 0))
        args = [str(secret), str(tmp_path), str(os.getpid()), str(listener.getsockname()[1]), abstract]
        args += [str(udp.getsockname()[1]), str(unix_path)]
        command = landlock.launch(landlock.worker_rules(), mode, [sys.executable, "-c", PROBE, *args])
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd="/", check=False)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


@needs_landlock
def test_a_confined_process_reads_python_and_nothing_of_the_server(tmp_path: Path) -> None:
    got = _probe(tmp_path, "required")
    assert got["abi"] == str(ABI)
    assert got["stdlib"] == got["dev null"] == "allowed"
    denied = f"refused {errno.EACCES}"
    assert got["secret"] == got["server environ"] == got["listing"] == got["write"] == got["remove"] == denied, got
    if ABI >= 6:
        assert got["signal"] == f"refused {errno.EPERM}", got
    # No socket is made at all (the seccomp filter), so none of Landlock's gaps is left open.
    assert got["seccomp"] == "1", got
    no_socket = f"refused {errno.EPERM}"
    assert got["tcp"] == got["abstract unix"] == got["udp"] == got["unix path"] == no_socket, got


def test_without_confinement_the_same_probe_reaches_everything(tmp_path: Path) -> None:
    # The probe's refusals above are Landlock's: turned off, each is allowed.
    got = _probe(tmp_path, "off")
    assert got["abi"] == got["seccomp"] == "0: turned off"
    assert {key for key, value in got.items() if value != "allowed"} == {"abi", "seccomp"}, got


def test_the_rules_never_open_the_checkout_or_the_root() -> None:
    # The default data folder is .flowport in the working directory, often a checkout.
    read = [Path(p) for p in landlock.worker_rules()["read"]]
    assert Path("/") not in read
    assert not any(REPO.is_relative_to(root) for root in read), read
    assert (REPO / "server" / "sandbox") in read or not (REPO / "server" / "sandbox").is_dir()


def test_the_folders_of_loaded_libraries_are_read_and_no_other_mapped_file(tmp_path: Path) -> None:
    import mmap

    from grpc._cython import cygrpc

    shared = tmp_path / "cache.so.db-shm"  # a mapped data file, whatever its name holds
    shared.write_bytes(b"\0" * 4096)
    with shared.open("r+b") as file, mmap.mmap(file.fileno(), 4096):
        read = landlock.worker_rules()["read"]
    assert os.path.dirname(cygrpc.__file__) in read
    assert not any(tmp_path.is_relative_to(root) for root in read), read


def test_modules_found_through_pythonpath_are_read_but_never_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deps = tmp_path / "deps"  # pip install --target deps; PYTHONPATH=deps
    deps.mkdir()
    monkeypatch.syspath_prepend(str(deps))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # python -m from here puts the working directory first
    read = landlock.worker_rules()["read"]
    assert str(deps) in read and str(tmp_path) not in read


def test_required_refuses_to_start_when_the_kernel_offers_none(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unsupported(rules: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    ran: list[list[str]] = []
    monkeypatch.setattr(landlock, "confine", unsupported)
    monkeypatch.setattr(os, "execv", lambda path, argv: ran.append(argv))
    # Never on the test process itself: it would lose its sockets.
    monkeypatch.setattr(landlock, "forbid_sockets", lambda: None)
    monkeypatch.setenv(landlock.ENV_SECCOMP, "")
    argv = ["landlock.py", json.dumps({"read": [], "read_write": []}), "required", "--", "/bin/true"]
    with pytest.raises(SystemExit) as ended:
        landlock.main(argv)
    assert ended.value.code == landlock.CONFINEMENT_FAILED and ran == []
    assert "Landlock is required and this kernel offers no Landlock" in capsys.readouterr().err
    # auto runs the worker anyway, and says why it is not confined.
    monkeypatch.setenv(landlock.ENV_RESULT, "")  # so that it is put back
    landlock.main([*argv[:2], "auto", *argv[3:]])
    assert ran == [["/bin/true"]]
    assert os.environ[landlock.ENV_RESULT] == "0: this kernel offers no Landlock"

    # Any other failure (a Python built without ctypes) is "not confined" too, never a crash.
    def no_ctypes(rules: object) -> int:
        raise ModuleNotFoundError("No module named '_ctypes'")

    monkeypatch.setattr(landlock, "confine", no_ctypes)
    landlock.main([*argv[:2], "auto", *argv[3:]])
    assert ran == [["/bin/true"], ["/bin/true"]]
    assert os.environ[landlock.ENV_RESULT].startswith("0: cannot make the system calls: ModuleNotFoundError")
    with pytest.raises(SystemExit) as ended:
        landlock.main(argv)
    assert ended.value.code == landlock.CONFINEMENT_FAILED


def test_a_refused_seccomp_filter_stops_required_and_is_reported_by_auto(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused() -> None:
        raise OSError(errno.EINVAL, "no seccomp here")

    ran: list[list[str]] = []
    monkeypatch.setattr(landlock, "confine", lambda rules: 6)
    monkeypatch.setattr(landlock, "forbid_sockets", refused)
    monkeypatch.setattr(os, "execv", lambda path, argv: ran.append(argv))
    monkeypatch.setenv(landlock.ENV_RESULT, "")
    monkeypatch.setenv(landlock.ENV_SECCOMP, "")
    argv = ["landlock.py", json.dumps({"read": [], "read_write": []}), "required", "--", "/bin/true"]
    with pytest.raises(SystemExit) as ended:
        landlock.main(argv)
    assert ended.value.code == landlock.CONFINEMENT_FAILED and ran == []
    assert "its seccomp filter was refused" in capsys.readouterr().err
    landlock.main([*argv[:2], "auto", *argv[3:]])
    assert ran == [["/bin/true"]]
    assert os.environ[landlock.ENV_SECCOMP] == "0: [Errno 22] no seccomp here"


@needs_landlock
@pytest.mark.asyncio
async def test_a_worker_the_confinement_stops_says_how_to_start_it_unconfined() -> None:
    pool = SandboxPool(size=1)
    # An installation that needs a file the rules leave out; here, the interpreter itself.
    pool.landlock_rules = {"read": [], "read_write": []}
    pool._command = landlock.launch(pool.landlock_rules, "auto", [sys.executable, "-c", "pass"])
    with pytest.raises(SandboxCrashed, match=r"failed to start .*--sandbox-landlock off starts it unconfined"):
        await pool.start()


def _status(pid: int) -> str:
    return Path(f"/proc/{pid}/status").read_text()


@needs_landlock
@pytest.mark.asyncio
async def test_the_pools_workers_are_confined_and_say_so() -> None:
    pool = SandboxPool(size=1)
    await pool.start()
    try:
        assert pool.landlock == str(ABI) and pool.seccomp == "1"
        assert "NoNewPrivs:\t1" in _status(pool.pids[0])
        assert "Seccomp:\t2" in _status(pool.pids[0]), "in filter mode"
        assert await pool.run("result = n + 1", {"n": 1}, tenant="acme") == 2
    finally:
        await pool.close()
    unconfined = SandboxPool(size=1, landlock_mode="off")
    await unconfined.start()
    try:
        assert unconfined.landlock == unconfined.seccomp == "0: turned off"
        assert "NoNewPrivs:\t0" in _status(unconfined.pids[0])
    finally:
        await unconfined.close()


def test_start_warns_of_a_data_folder_the_workers_may_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    confined = SimpleNamespace(landlock="7", seccomp="1", landlock_rules={"read": [str(tmp_path)]})
    with caplog.at_level(logging.WARNING, logger="flowport.server"):
        _report_confinement(settings, confined)  # type: ignore[arg-type]
    assert f"{tmp_path / 'data'} lies in {tmp_path}, which sandbox workers may read" in caplog.text
    caplog.clear()
    apart = SimpleNamespace(landlock="7", seccomp="1", landlock_rules={"read": [str(tmp_path / "python")]})
    with caplog.at_level(logging.WARNING, logger="flowport.server"):
        _report_confinement(settings, apart)  # type: ignore[arg-type]
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="flowport.server"):
        _report_confinement(
            settings, SimpleNamespace(landlock="0: turned off", seccomp="0: turned off", landlock_rules={})
        )  # type: ignore[arg-type]
    assert "not confined by Landlock (turned off)" in caplog.text
    caplog.clear()
    no_filter = SimpleNamespace(landlock="7", seccomp="0: no seccomp filter for riscv64", landlock_rules={"read": []})
    with caplog.at_level(logging.WARNING, logger="flowport.server"):
        _report_confinement(settings, no_filter)  # type: ignore[arg-type]
    assert "may create sockets: their seccomp filter is not installed (no seccomp filter for riscv64)" in caplog.text
    caplog.clear()
    # A key file is private too, and a readable root reached through a symbolic link is seen through.
    (tmp_path / "python").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "python")
    keyed = Settings(data_dir=tmp_path / "data", secrets_key_file=tmp_path / "python" / "etc" / "key")
    linked = SimpleNamespace(landlock="7", seccomp="1", landlock_rules={"read": [str(tmp_path / "link")]})
    with caplog.at_level(logging.WARNING, logger="flowport.server"):
        _report_confinement(keyed, linked)  # type: ignore[arg-type]
    assert f"{tmp_path / 'python' / 'etc' / 'key'} lies in {tmp_path / 'python'}" in caplog.text
