"""What user code may do inside a sandbox worker: imports, builtins, and the audit hook.

Layers, outermost first (an audit hook alone is not a sandbox, PEP 578):

- the restricted `__import__` and the safe builtins user code starts with;
- the audit hook: it refuses file writes, reads outside the allowed
  directories, network, processes, native code, interpreter hooks, frame
  introspection and every event it does not know, and it refuses every
  import of a module that was not loaded at warm-up;
- `remove_unaudited()`, which deletes the few dangerous functions CPython
  raises no audit event for (pidfd signals, mknod, clock_settime, loading
  extension modules by hand, signal handlers and timers, and reading or
  writing file descriptors by number, which would reach the worker's pipes);
- kernel limits the worker sets on itself (see worker.py).
"""

from __future__ import annotations

import builtins
import importlib
import os
import posix
import sys
import sysconfig
from collections.abc import Callable, Iterable
from typing import Any

import orjson

# Top-level modules user code may import (with their submodules).
ALLOWED_IMPORTS = frozenset(
    {
        "math", "json", "re", "datetime", "decimal", "fractions", "statistics", "random", "itertools",
        "functools", "collections", "string", "textwrap", "uuid", "hashlib", "hmac", "base64", "time",
        "typing", "dataclasses", "enum", "operator", "copy", "bisect", "heapq", "zoneinfo", "unicodedata",
    }
)  # fmt: skip

# Modules C code imports by name at call time through the caller's
# `__import__`, which in user code is the restricted one (time.strptime).
INTERNAL_IMPORTS = frozenset({"_strptime"})

# Loaded at warm-up besides ALLOWED_IMPORTS: their submodules and what they
# import lazily on first use, since nothing can be imported after the hook.
PRELOAD = (
    "json.decoder", "json.encoder", "json.scanner", "collections.abc", "zoneinfo._common",
    "zoneinfo._tzpath", "_strptime", "importlib.resources", "linecache", "tokenize", "encodings.idna",
    "encodings.punycode", "encodings.unicode_escape", "encodings.raw_unicode_escape", "encodings.latin_1",
    "encodings.ascii", "encodings.utf_16", "encodings.utf_32", "encodings.utf_8_sig", "encodings.cp1252",
    "encodings.cp437", "encodings.iso8859_15", "encodings.base64_codec", "encodings.hex_codec",
)  # fmt: skip

# Native modules whose functions do what the hook refuses without raising
# audit events (_posixsubprocess.fork_exec, pwd reading /etc/passwd...). If
# warm-up loaded one, the worker refuses to start rather than expose it.
FORBIDDEN_LOADED = frozenset(
    {"_posixsubprocess", "_socket", "socket", "_ctypes", "ctypes", "mmap", "_multiprocessing", "_posixshmem", "pwd",
     "grp", "termios", "pty", "_ssl", "gc", "faulthandler", "_tracemalloc"}
)  # fmt: skip

# Dangerous functions CPython raises no audit event for, removed from their
# modules before the hook goes in; they cannot come back by re-importing
# since imports are refused afterwards. The worker keeps its own references
# to the signal functions it needs.
_SIGNAL_CALLS = (
    "signal", "getsignal", "setitimer", "getitimer", "alarm", "pause", "set_wakeup_fd", "siginterrupt",
    "pthread_sigmask", "pthread_kill", "sigwait", "sigwaitinfo", "sigtimedwait", "raise_signal", "pidfd_send_signal",
)  # fmt: skip
_OS_CALLS = (
    "pidfd_open", "mknod", "mkfifo", "chroot", "sched_setaffinity", "sched_setscheduler", "sched_setparam",
    "setpriority", "setns", "unshare",
)  # fmt: skip
# Raw descriptor I/O: the worker's protocol pipes are descriptors too, and
# user code that could write to them could answer for a job it did not run.
# Opening a descriptor as a file object raises "open" with an int, which the
# hook refuses.
_FD_CALLS = (
    "read", "readv", "pread", "preadv", "write", "writev", "pwrite", "pwritev", "sendfile", "splice",
    "copy_file_range", "dup", "dup2", "close", "closerange", "eventfd", "eventfd_read", "eventfd_write",
    "set_blocking", "openpty", "login_tty", "memfd_create",
)  # fmt: skip
UNAUDITED: dict[str, tuple[str, ...]] = {
    "posix": _OS_CALLS + _FD_CALLS,
    "os": _OS_CALLS + _FD_CALLS,
    "_signal": _SIGNAL_CALLS,
    "signal": _SIGNAL_CALLS,
    "time": ("clock_settime", "clock_settime_ns"),
    "_imp": ("create_builtin", "create_dynamic", "exec_builtin", "exec_dynamic"),
}

# Builtins user code does not get: code execution, namespace introspection,
# interactive helpers. `open` is replaced by a read-only one.
REMOVED_BUILTINS = frozenset(
    {"open", "exec", "eval", "compile", "input", "breakpoint", "globals", "vars", "locals", "help", "exit", "quit",
     "copyright", "credits", "license", "__loader__", "__spec__"}
)  # fmt: skip

# Events ordinary computation raises, allowed without looking at arguments.
# Every event not named here or handled in the hook is refused.
ALLOWED_EVENTS = frozenset(
    {"exec", "compile", "object.__setattr__", "object.__delattr__", "builtins.id", "sys._getframemodulename",
     "function.__new__", "array.__new__", "sys.excepthook", "sys.unraisablehook", "time.sleep", "marshal.dumps",
     "cpython._PySys_ClearAuditHooks", "cpython.PyInterpreterState_Clear"}
)  # fmt: skip

# Attributes that lead to a frame. From any frame, `f_back` (which raises no
# event) walks up into the worker's own frames: its pipes, its job loop and
# the inputs of the next job. So no frame is handed out at all.
FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
# sys._getframe is refused with the ValueError it raises when the stack is
# not that deep: the stdlib callers (namedtuple, typing, enum looking up their
# caller's module name) expect that error and fall back.
NO_FRAME = "frames are not available in the sandbox"

# What a refused event is called in its message, by event-name prefix; the
# first match wins, events matching none are an "operation".
_CATEGORIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("socket.", "http.", "urllib.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
      "webbrowser."), "network access"),
    (("subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.startfile",
      "pty."), "subprocess"),
    (("os.kill", "os.killpg", "signal."), "signalling processes"),
    (("ctypes.", "mmap.", "fcntl.", "msvcrt.", "winreg.", "_winapi."), "native code access"),
    (("os.putenv", "os.unsetenv"), "environment change"),
    (("resource.",), "resource limit change"),
    (("os.", "shutil.", "tempfile.", "glob.", "pathlib."), "file system access"),
    (("sys.", "gc.", "code.", "marshal.", "pickle.", "builtins.", "cpython.", "pdb."), "interpreter access"),
)  # fmt: skip

# Raised by the user-facing `open` so the hook checks the path against the
# read allowlist alone (the plain "open" event also allows the stdlib).
USER_OPEN_EVENT = "flowport.sandbox.open"
IMPORT_REFUSED = "is not allowed"
MAX_SYMLINKS = 40
MAX_SHOWN = 300

AuditHook = Callable[[str, tuple[Any, ...]], None]


class PolicyImportError(ImportError):
    """An import outside the allowlist. An ImportError so `try: import x except ImportError` still works."""


def import_allowed(name: str) -> bool:
    """Whether user code may import `name` (an allowed module or a submodule of one)."""
    return name.partition(".")[0] in ALLOWED_IMPORTS


def is_import_refusal(exc: BaseException) -> bool:
    """Whether `exc` is the policy refusing an import (by the importer or the hook)."""
    return isinstance(exc, ImportError) and str(exc).endswith(IMPORT_REFUSED) and str(exc).startswith("import of ")


def preload() -> None:
    """Import every module user code may need, so none is imported after the hook."""
    for name in sorted(ALLOWED_IMPORTS) + list(PRELOAD):
        importlib.import_module(name)


def unsafe_loaded() -> list[str]:
    """Forbidden native modules that are loaded in this process."""
    return sorted(FORBIDDEN_LOADED.intersection(sys.modules))


def remove_unaudited() -> None:
    """Delete the unaudited dangerous functions from their modules (worker only)."""
    for module_name, names in UNAUDITED.items():
        module = sys.modules.get(module_name)
        for name in names if module is not None else ():
            module.__dict__.pop(name, None)


def internal_read_roots(read_allowlist: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(directories the interpreter may read, directories excluded from them).

    The stdlib (linecache reads it), the time zone database (zoneinfo), and the
    read allowlist; not site-packages, even where it lies inside the stdlib.
    """
    import zoneinfo

    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths["stdlib"]), os.path.realpath(paths["platstdlib"])}
    roots.update(os.path.realpath(p) for p in zoneinfo.TZPATH)
    roots.update(os.path.realpath(p) for p in read_allowlist)
    excluded = {os.path.realpath(paths["purelib"]), os.path.realpath(paths["platlib"])}
    return tuple(sorted(roots)), tuple(sorted(excluded - roots))


def make_hook(  # noqa: PLR0915 - one flat hook on purpose, see the docstring
    *,
    internal_roots: Iterable[str],
    excluded_roots: Iterable[str] = (),
    user_roots: Iterable[str] = (),
    cwd: str = "/",
    source_name: str = "",
    report_fd: int,
    frame_gate: bytearray | None = None,
) -> AuditHook:
    """The audit hook: it returns to allow an event and raises to refuse it.

    A refusal is written to `report_fd` as a protocol frame before the
    exception is raised, so user code that catches the exception cannot hide
    it. Refused imports are only raised, as ImportError, so an optional import
    that falls back is not a violation.

    The hook is one flat function whose variables are all immutable values or
    C functions: its frame is visible to user code (in the traceback of the
    exception it raises), and a Python helper found there could be rewritten
    through its `__code__` or closure cells.

    `source_name` is the file name user code is compiled under: on a syntax
    error the compiler tries to open it to quote the line. It does not exist
    (relative to `cwd`), so reading it is allowed.

    Frame attributes are refused unless `frame_gate[0]` is set: the worker
    opens the gate to find the line of an error in a traceback, and user code
    cannot reach the gate (it is held by this closure and the worker's runner,
    and without frames neither is reachable).
    """
    internal, excluded, user = tuple(internal_roots), tuple(excluded_roots), tuple(user_roots)
    allowed, categories, user_open = ALLOWED_EVENTS, _CATEGORIES, USER_OPEN_EVENT
    listing_events = frozenset({"os.listdir", "os.scandir", "os.walk"})
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    lstat, readlink, write, dumps = posix.lstat, posix.readlink, posix.write, orjson.dumps
    fs_encoding = sys.getfilesystemencoding()
    _type, _str, _bytes, _int, _len, _repr = type, str, bytes, int, len, repr
    os_error, value_error, import_error, permission_error = OSError, ValueError, ImportError, PermissionError
    max_links, max_shown, refused_import = MAX_SYMLINKS, MAX_SHOWN, IMPORT_REFUSED
    frame_attributes, no_frame, gate = FRAME_ATTRIBUTES, NO_FRAME, frame_gate or bytearray(1)

    def hook(event: str, args: tuple[Any, ...]) -> None:  # noqa: PLR0915
        if event in allowed:
            return
        path: Any = None
        roots: tuple[str, ...] = ()
        if event == "object.__getattr__":
            name = args[1] if _len(args) == 2 else None
            if _type(name) is not _str or name not in frame_attributes or gate[0]:
                return
            message = f"frame introspection refused ({name})"
        elif event == "sys._getframe":
            raise value_error(no_frame)
        elif event == "open" and _len(args) == 3:
            path, mode, flags = args
            if _type(flags) is _int and not flags & write_flags:
                if source_name and _type(path) is _str and path == source_name:
                    return
                roots = internal
            plain = _type(path) in (_str, _bytes, _int) and (mode is None or _type(mode) is _str)
            message = "file access refused: " + (f"open({path!r}, {mode!r})" if plain else "open(<object>)")
        elif event == user_open and _len(args) == 2:
            path, mode = args
            if _type(mode) is _str and "w" not in mode and "a" not in mode and "x" not in mode and "+" not in mode:
                roots = user
            plain = _type(path) in (_str, _bytes) and _type(mode) is _str
            message = "file access refused: " + (f"open({path!r}, {mode!r})" if plain else "open(<object>)")
        elif event in listing_events and _len(args) >= 1:
            path = args[0]
            roots = internal
            shown = _repr(path) if _type(path) in (_str, _bytes, _int) or path is None else "<object>"
            message = f"file access refused: {event}({shown})"
        elif event == "import":
            name = args[0] if _len(args) and _type(args[0]) is _str else "<object>"
            raise import_error(f"import of {name[:max_shown]!r} {refused_import}")
        else:
            message = f"operation refused ({event})"
            for prefixes, what in categories:
                if event.startswith(prefixes):
                    message = f"{what} refused ({event})"
                    break
        if roots:
            # realpath() from bound primitives: symlinks are followed, so a
            # link inside an allowed directory cannot lead outside it.
            if _type(path) is _bytes:
                path = _bytes.decode(path, fs_encoding, "surrogateescape")
            resolved: str | None = None
            if _type(path) is _str and "\x00" not in path:
                pending = (path if path.startswith("/") else cwd + "/" + path).split("/")
                pending.reverse()
                done: list[str] = []
                links = 0
                resolved = ""
                while pending:
                    part = pending.pop()
                    if part in ("", "."):
                        continue
                    if part == "..":
                        if done:
                            done.pop()
                        continue
                    candidate = "/" + "/".join([*done, part])
                    try:
                        is_link = lstat(candidate).st_mode & 0o170000 == 0o120000
                    except (os_error, value_error):
                        is_link = False  # does not exist: nothing to follow
                    if not is_link:
                        done.append(part)
                        continue
                    links += 1
                    try:
                        target = readlink(candidate)
                    except (os_error, value_error):
                        target = ""  # changed under us: refuse
                    if links > max_links or not target:
                        resolved = None
                        break
                    if target.startswith("/"):
                        done = []
                    parts = target.split("/")
                    parts.reverse()
                    pending.extend(parts)
                if resolved is not None:
                    resolved = "/" + "/".join(done)
            if resolved is not None:
                inside = False
                for root in roots:
                    if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
                        inside = True
                        break
                for root in excluded if inside else ():
                    if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
                        inside = False
                        break
                for root in user if not inside else ():  # the read allowlist wins over the exclusions
                    if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
                        inside = True
                        break
                if inside:
                    return
        message = message[:max_shown]
        payload = dumps({"violation": message})
        try:  # noqa: SIM105 - contextlib would put a Python object in this frame
            write(report_fd, _len(payload).to_bytes(4, "big") + payload)
        except os_error:
            pass  # the parent is gone; the refusal below still stands
        raise permission_error(message)

    return hook


def make_importer(real_import: Callable[..., Any]) -> Callable[..., Any]:
    """The `__import__` of user code: the allowlist, then the real import."""
    allowed, internal, refusal, _type, _str = ALLOWED_IMPORTS, INTERNAL_IMPORTS, PolicyImportError, type, str

    def restricted_import(
        name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
    ) -> Any:
        if _type(name) is not _str or level != 0:
            raise refusal(f"import of {'a relative module' if level else '<object>'} {IMPORT_REFUSED}")
        if name.partition(".")[0] not in allowed and name not in internal:
            raise refusal(f"import of {name!r} {IMPORT_REFUSED}")
        return real_import(name, globals, locals, fromlist, 0)

    return restricted_import


def make_open(real_open: Callable[..., Any]) -> Callable[..., Any]:
    """The `open` of user code: read-only, and only inside the read allowlist.

    It raises USER_OPEN_EVENT with the path it is about to open, so the hook
    (which user code cannot alter) decides; the real `open` is checked again.
    """
    audit, fspath = sys.audit, os.fspath

    def open(  # noqa: PLR0917 - the signature of the builtin it replaces
        file: Any, mode: str = "r", buffering: int = -1, encoding: str | None = None,
        errors: str | None = None, newline: str | None = None,
    ) -> Any:  # fmt: skip
        path = fspath(file)
        audit(USER_OPEN_EVENT, path, mode)
        return real_open(path, mode, buffering, encoding, errors, newline)

    return open


def safe_builtins() -> dict[str, Any]:
    """The builtins of user code (a template: copy it for each job)."""
    namespace = {k: v for k, v in vars(builtins).items() if k not in REMOVED_BUILTINS}
    namespace["__import__"] = make_importer(builtins.__import__)
    namespace["open"] = make_open(builtins.open)
    return namespace
