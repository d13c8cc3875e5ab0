"""Landlock: the kernel's own confinement of a sandbox worker, beneath the audit hook.

The audit hook (policy.py) is the sandbox's first layer, but it lives in the
worker's own interpreter, and an escape from it would leave the worker with
everything its uid may do: in an image where the worker cannot switch to
`nobody`, that is reading the server's data folder (every tenant's rows and
the secrets key), its `/proc/<pid>/environ`, and signalling it. Landlock
(Linux 5.13 and later) makes the kernel refuse those whatever the worker's
code does:

- the file system: only reading the Python installation, the system's
  libraries, the flowport modules the worker imports, the time zone
  database and the read allowlist, and reading and writing `/dev/null`;
  nothing is written, created or removed anywhere (ABI 1 to 3, ioctl on
  devices from ABI 5);
- TCP: no port is bound or connected (ABI 4);
- no abstract Unix socket is reached and no process outside the worker is
  signalled (ABI 6).

Each holds on the kernels whose ABI has it; on an older kernel the rest
still do. Landlock has no rule for UDP nor for connecting to a Unix socket
by its path, so a seccomp filter comes with it: the worker, which talks to
the server over pipes, creates no socket at all (`socket` and
`io_uring_setup`, which can make one, fail with EPERM; so does every system
call of another architecture's table, such as x32's or i386's). It is
installed whenever confinement is on, whatever Landlock offers, on x86-64
and arm64. The worker is started through this file, run as a script with the
stdlib only (`python -s -S -P landlock.py RULES MODE -- COMMAND`): it confines
itself, then execs the worker, and the confinement holds across the exec for
the worker's whole life. ctypes, which makes the system calls, is never
loaded in the worker: user code could reach its classes through
`object.__subclasses__()`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

# Set for the worker: the ABI it is confined with ("0: why" when it is not).
ENV_RESULT = "FLOWPORT_WORKER_LANDLOCK"
MODES = ("auto", "required", "off")
# The worker's exit status when `required` confinement failed (the worker's own refusals use 3).
CONFINEMENT_FAILED = 5

# Set for the worker: "1" when the seccomp filter is installed ("0: why" when it is not).
ENV_SECCOMP = "FLOWPORT_WORKER_SECCOMP"

# linux/landlock.h
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same number on every architecture
_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_V1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_REFER, _TRUNCATE, _IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | _TRUNCATE | _IOCTL_DEV  # the rights a rule on a file may hold
_NET_TCP = (1 << 0) | (1 << 1)  # BIND_TCP, CONNECT_TCP
_SCOPES = (1 << 0) | (1 << 1)  # ABSTRACT_UNIX_SOCKET, SIGNAL

READ = EXECUTE | READ_FILE | READ_DIR
READ_WRITE_DEVICE = READ_FILE | WRITE_FILE | _TRUNCATE | _IOCTL_DEV

# The worker's own modules, beside the Python installation.
_WORKER_PACKAGES = ("flowport.server", "flowport.server.sandbox")
_SYSTEM = ("/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/localtime")
# libc.so.6, _ssl.cpython-311-x86_64-linux-gnu.so; not x.sock nor a database's -shm file.
_SHARED_OBJECT = re.compile(r"\.so(\.[0-9.]+)?$")


def worker_rules(read_allowlist: Iterable[str] = ()) -> dict[str, list[str]]:
    """What a worker may open: {"read": paths it reads beneath, "read_write": devices}.

    Computed in the server, whose interpreter and modules the worker shares.
    """
    import importlib.util
    import site
    import sysconfig
    import zoneinfo

    paths = sysconfig.get_paths()
    read = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    read.update(paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib"))
    read.update(site.getsitepackages())
    read.add(site.getusersitepackages())
    read.add(os.path.join(sys.prefix, "pyvenv.cfg"))  # a virtual environment's
    for name in _WORKER_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            read.update(spec.submodule_search_locations)
    top = importlib.util.find_spec("flowport")
    if top is not None and top.origin and os.path.isfile(top.origin):
        # Its file only: the package's folder may be a checkout that holds a data folder.
        read.add(top.origin)
        if top.cached:
            read.add(top.cached)
    # Where the server finds modules (PYTHONPATH, .pth files, `pip install --target`): the worker
    # has the same path. Not the working directory, which may be a checkout holding the data folder.
    here = os.path.realpath(os.getcwd())
    read.update(p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) != here)
    read.update(_SYSTEM)
    read.update(_library_folders())
    read.update(zoneinfo.TZPATH)
    read.update(read_allowlist)
    # Never the whole file system, whatever the installation's prefix says.
    return {
        "read": sorted(os.path.abspath(p) for p in read if p and os.path.abspath(p) != "/"),
        "read_write": [os.devnull],
    }


def _library_folders() -> set[str]:
    """Folders of the shared libraries this interpreter has loaded (outside /usr on some
    installations: /opt, /nix/store...): the worker is the same interpreter and loads them too.
    Libraries only: other mapped files, such as a SQLite database's shared memory, stay out."""
    folders = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rstrip("\n").partition("/")[2]
                if path and _SHARED_OBJECT.search(os.path.basename(path)) and not path.endswith(" (deleted)"):
                    folders.add(os.path.dirname("/" + path))
    except OSError:
        pass  # no /proc: the system folders above cover a usual installation
    return folders


def launch(rules: dict[str, list[str]], mode: str, command: Sequence[str]) -> list[str]:
    """The command line that confines itself by `rules` (per `mode`), then runs `command`."""
    if mode not in MODES:
        raise ValueError(f"Landlock mode must be one of {', '.join(MODES)}")
    # No site packages, user site or script folder on the path: the launcher needs the stdlib only.
    # Not -I, which would also drop PYTHONHOME, which a relocated Python needs to start at all.
    return [sys.executable, "-s", "-S", "-P", os.path.abspath(__file__), json.dumps(rules), mode, "--", *command]


def abi() -> int:
    """The Landlock ABI this kernel offers; 0 when it has none (too old, turned off, or a seccomp filter)."""
    try:
        return _System().call(_CREATE_RULESET, None, 0, _RULESET_VERSION)
    except OSError:
        return 0


def confine(rules: dict[str, list[str]]) -> int:
    """Confine this process, and what it execs, to `rules`; returns the ABI used.

    Raises OSError when the kernel offers no Landlock or refuses a step. A
    path that does not exist is skipped.
    """
    import ctypes

    system = _System()
    version = system.call(_CREATE_RULESET, None, 0, _RULESET_VERSION)
    handled_fs = _FS_V1 | (_REFER if version >= 2 else 0) | (_TRUNCATE if version >= 3 else 0)
    handled_fs |= _IOCTL_DEV if version >= 5 else 0

    class RulesetAttr(ctypes.Structure):
        _fields_ = [
            ("handled_access_fs", ctypes.c_uint64),
            ("handled_access_net", ctypes.c_uint64),
            ("scoped", ctypes.c_uint64),
        ]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    attr = RulesetAttr(handled_fs, _NET_TCP if version >= 4 else 0, _SCOPES if version >= 6 else 0)
    size = 24 if version >= 6 else 16 if version >= 4 else 8  # the fields this ABI knows
    ruleset = system.call(_CREATE_RULESET, ctypes.byref(attr), size, 0)
    try:
        for rights, where in ((READ, rules["read"]), (READ_WRITE_DEVICE, rules["read_write"])):
            for path in where:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue  # not on this machine
                try:
                    allowed = rights & handled_fs
                    if not _is_dir(fd):
                        allowed &= _FILE_RIGHTS
                    rule = PathBeneath(allowed, fd)
                    system.call(_ADD_RULE, ruleset, _RULE_PATH_BENEATH, ctypes.byref(rule), 0)
                finally:
                    os.close(fd)
        system.libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # needed to confine oneself without privileges
        system.call(_RESTRICT_SELF, ruleset, 0)
    finally:
        os.close(ruleset)
    return version


# linux/seccomp.h, linux/filter.h, linux/audit.h. By machine: (AUDIT_ARCH, socket, io_uring_setup).
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_LD_W_ABS, _JEQ_K, _JGE_K, _RET_K = 0x20, 0x15, 0x35, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | errno.EPERM
_X32_BIT = 0x40000000  # x86-64's x32 table: the same calls under other numbers


def forbid_sockets() -> None:
    """Install the seccomp filter that refuses creating sockets (see the module's docstring) on
    this process and what it execs. Raises OSError when the kernel refuses it, and when this
    machine's architecture is not one the filter knows."""
    import ctypes
    import platform
    import struct

    machine = platform.machine()
    if machine not in _SECCOMP_ARCHES:
        raise OSError(errno.EOPNOTSUPP, f"no seccomp filter for {machine}")
    arch, socket_call, io_uring_setup = _SECCOMP_ARCHES[machine]
    # (code, jump if true, jump if false, k): offsets count from the next instruction.
    program = [
        (_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_JEQ_K, 1, 0, arch),
        (_RET_K, 0, 0, _RET_EPERM),  # another architecture's table
        (_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_JGE_K, 2, 0, _X32_BIT),
        (_JEQ_K, 1, 0, socket_call),
        (_JEQ_K, 0, 1, io_uring_setup),
        (_RET_K, 0, 0, _RET_EPERM),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    filters = ctypes.create_string_buffer(code, len(code))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    prog = Program(len(program), ctypes.cast(filters, ctypes.c_void_p))
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:  # needed without privileges
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _is_dir(fd: int) -> bool:
    import stat

    return stat.S_ISDIR(os.fstat(fd).st_mode)


class _System:
    """syscall(2) through ctypes, raising OSError on failure."""

    def __init__(self) -> None:
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self.libc.syscall
        self._syscall.restype = ctypes.c_long
        self._ctypes = ctypes

    def call(self, number: int, *args: Any) -> int:
        ctypes = self._ctypes
        converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
        result = int(self._syscall(ctypes.c_long(number), *converted))
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        return result


def main(argv: list[str]) -> None:
    """`landlock.py RULES MODE -- COMMAND...`: confine, then exec COMMAND (with ENV_RESULT set)."""
    rules, mode, command = json.loads(argv[1]), argv[2], argv[4:]
    if mode != "off":
        try:
            os.environ[ENV_RESULT] = str(confine(rules))
        except Exception as exc:  # noqa: BLE001 - any failure is "not confined": auto runs on, required stops
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
                why = "this kernel offers no Landlock"
            elif isinstance(exc, OSError):
                why = f"refused: {exc.strerror}"
            else:  # a Python built without ctypes, say
                why = f"cannot make the system calls: {type(exc).__name__}: {exc}"
            if mode == "required":
                sys.stderr.write(f"sandbox worker not started: Landlock is required and {why}\n")
                sys.exit(CONFINEMENT_FAILED)
            os.environ[ENV_RESULT] = f"0: {why}"
        try:
            forbid_sockets()
            os.environ[ENV_SECCOMP] = "1"
        except Exception as exc:  # noqa: BLE001 - as above: auto runs on, required stops
            if mode == "required":
                sys.stderr.write(f"sandbox worker not started: its seccomp filter was refused: {exc}\n")
                sys.exit(CONFINEMENT_FAILED)
            os.environ[ENV_SECCOMP] = f"0: {exc}"
    else:
        os.environ[ENV_RESULT] = "0: turned off"
        os.environ[ENV_SECCOMP] = "0: turned off"
    os.execv(command[0], command)  # noqa: S606 - the worker's command line, from the server


if __name__ == "__main__":
    main(sys.argv)
