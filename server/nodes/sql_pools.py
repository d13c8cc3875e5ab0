"""Shared SQLAlchemy async engines (connection pools), one per database.

SQL nodes never create an engine per call: `SqlPools.engine` returns the
process-wide `AsyncEngine` for a connection string, creating it on first
use. The first caller's pool settings win for the life of the engine.

Connection strings name the database, not the driver: `sqlite:///name.db`
and `postgresql://user:pass@host:5432/db` (also `postgres://`) are mapped
to the async drivers `sqlite+aiosqlite` and `postgresql+asyncpg`; naming
those drivers explicitly is accepted too. Anything else is refused with
`UnsupportedDatabase`.

A PostgreSQL connection string must name its host(s) (no Unix sockets, no
fallback to the environment's PGHOST) and may carry only the query
parameters in `POSTGRES_QUERY_PARAMETERS` (none that reads a file on this
machine or names a target elsewhere: dsn, service, passfile, …). Every new
connection of a PostgreSQL engine then goes through the SSRF guard HTTP
nodes use (server/egress.py): each host is resolved, a private, loopback or
link-local address is refused unless `--sql-allowlist` names the host or
the address, and the connection is made to the address that was checked,
so a second DNS answer cannot swap in an internal one (TLS still uses the
name, below); an allowlisted name is connected to by name. The refusal is
raised from the connection attempt, so a node, a resource's pool and the
pool health sweep all meet it. A connection string
without a password gets none: never the server's own (PGPASSWORD, ~/.pgpass).

A tenant's connection carries nothing of the server's: the connection
string must name its user and database (no PGUSER, PGDATABASE or OS user
name), and TLS is set up here from `ssl` (default `prefer`) with a context
that holds no client certificate and trusts the system's CAs, so asyncpg
never reads PGSSLMODE, PGSSLCERT, PGSSLKEY, PGSSLROOTCERT, PGSSLNEGOTIATION
or ~/.postgresql. The TCP connection goes to the checked address while TLS
still uses the host's name (server name, and the certificate check with
`verify-full`). `prefer` and `allow` try TLS first and go on without it
when the server refuses it.

SQLite databases live in the tenant's own folder: `sqlite:///name.db` is
the file `name.db` in `<root>/<tenant>/` (`sqlite_folder`); absolute
paths, folders, `..` and URI file names are refused (`ForbiddenDatabase`),
`:memory:` is allowed. A symbolic link is never opened: the folder and the
file are checked when the engine is made and before each new connection.

`SqlPools.engine` keeps at most `MAX_ENGINES_PER_TENANT` engines per tenant
and `MAX_ENGINES` in all, dropping the least recently used; a dropped engine
is disposed once no statement runs on it (`using`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import platform
import re
import sqlite3
import ssl
import stat
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from flowport.server.egress import normalize_allowlist, resolve_host
from flowport.server.errors import shown

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncEngine

# Schemes a connection string may start with, and the async driver each maps to.
ASYNC_DRIVERS: Final = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}
# The same list as a JSON Schema `pattern` for node configs.
CONNECTION_STRING_PATTERN: Final = r"^(sqlite(\+aiosqlite)?|postgres(ql)?(\+asyncpg)?)://"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Query parameters a PostgreSQL connection string may carry: asyncpg's connection
# options (and SQLAlchemy's) that neither read files here nor pick the target.
POSTGRES_QUERY_PARAMETERS: Final = frozenset(
    {
        "ssl",
        "direct_tls",
        "timeout",
        "command_timeout",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "prepared_statement_cache_size",
        "target_session_attrs",
        # Several hosts (?host=a:5432&host=b:5432): each is checked like the URL's own.
        "host",
        "port",
    }
)
DEFAULT_POSTGRES_PORT: Final = 5432
# libpq's sslmode values; `prefer` when none is given, as libpq does.
SSL_MODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
DEFAULT_SSL_MODE: Final = "prefer"
# Query parameters a SQLite connection string may carry (others would become SQLite URI parameters).
SQLITE_QUERY_PARAMETERS: Final = frozenset({"timeout"})
# A SQLite database's name in the tenant's folder: one plain file name.
SQLITE_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
SQLITE_NAME_RULE: Final = (
    "a SQLite database is a file in the tenant's own folder: sqlite:///name.db (1 to 128 letters, digits, "
    "'.', '_' or '-', not starting with '.'), or sqlite:///:memory:"
)
# Engines SqlPools.engine keeps open per tenant and in all (least recently used dropped first).
MAX_ENGINES_PER_TENANT: Final = 8
MAX_ENGINES: Final = 128
# SQLite runs inside the server process: what a tenant's databases may take there. A file database
# grows to at most SQLITE_FILE_BYTES, an in-memory one to SQLITE_MEMORY_BYTES (SQLite's
# max_page_count, set on each connection: past it a write fails with "database or disk is full"),
# a tenant keeps at most SQLITE_FILES_PER_TENANT files, and a SQLite pool at most
# SQLITE_POOL_CONNECTIONS connections (each a thread): SQLite has one writer anyway.
SQLITE_FILE_BYTES: Final = 256 * 2**20
# The longest string or blob a tenant's SQLite statement may make (SQLite's SQLITE_LIMIT_LENGTH,
# 1e9 by default): one `randomblob(450000000)` took 2.4 GB of the server's memory for a one-row
# answer. A node's outputs are at most 8 MiB anyway.
SQLITE_MAX_VALUE_BYTES: Final = 16 * 2**20
SQLITE_MEMORY_BYTES: Final = 32 * 2**20
SQLITE_FILES_PER_TENANT: Final = 16
SQLITE_POOL_CONNECTIONS: Final = 4
# A pool of a tenant's own PostgreSQL holds at most this many connections, overflow included,
# whatever a node or resource asks for: with MAX_ENGINES_PER_TENANT pools, a tenant's sockets stay
# in the hundreds, not the thousands of file descriptors the process has.
MAX_POOL_CONNECTIONS: Final = 32
# Pools of named database resources a process keeps open per tenant, the least recently used
# closed beyond it (reopened at its next use): a tenant may keep thousands of resources.
MAX_RESOURCE_POOLS_PER_TENANT: Final = 16
_PLAIN_TENANT = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,62}\Z")
_TRUE, _FALSE = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})


class UnsupportedDatabase(ValueError):
    """A connection string for a database or driver flowport does not support."""


class ForbiddenDatabase(UnsupportedDatabase):
    """A SQLite database outside the tenant's own folder (or one that cannot be opened safely)."""


def async_url(connection_string: str) -> URL:
    """The async-driver URL for `connection_string`; raises UnsupportedDatabase
    (ForbiddenDatabase for a SQLite database outside the tenant's folder)."""
    match = _SCHEME.match(connection_string)
    scheme = match.group(1).lower() if match else ""
    driver = ASYNC_DRIVERS.get(scheme)
    if driver is None:
        shown = scheme or connection_string.split(":", 1)[0][:40]
        raise UnsupportedDatabase(
            f"unsupported database {shown!r}: use sqlite:///name.db or postgresql://user:pass@host:port/db"
        )
    # SQLAlchemy loads with the first SQL workflow or pool, not at start.
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(driver + connection_string[match.end(1) :] if match else connection_string)
    except ArgumentError as exc:
        raise UnsupportedDatabase(f"cannot parse the connection string for {scheme}: {exc}") from exc
    if url.get_backend_name() == "postgresql":
        arguments = connect_arguments(url)
        postgres_targets(arguments)
        tenant_options(arguments)
    else:
        check_sqlite(url)
    return url


def check_sqlite(url: URL) -> None:
    """Raise ForbiddenDatabase unless `url` names `:memory:` or a plain file name (see SQLITE_NAME_RULE)."""
    if url.username or url.password or url.host or url.port:
        raise UnsupportedDatabase("a sqlite connection string has no user, host or port: sqlite:///name.db")
    if "uri" in url.query or (url.database or "").startswith("file:"):
        raise ForbiddenDatabase(f"SQLite URI file names are not accepted: {SQLITE_NAME_RULE}")
    unknown = sorted(set(url.query) - SQLITE_QUERY_PARAMETERS)
    if unknown:
        raise UnsupportedDatabase(
            f"connection string parameter {shown(unknown[0], 40)} is not accepted for sqlite; "
            f"accepted: {', '.join(sorted(SQLITE_QUERY_PARAMETERS))}"
        )
    database = url.database or ""
    if _sqlite_memory(url):
        return
    if database.startswith(("/", "\\")) or re.match(r"\A[A-Za-z]:", database):
        raise ForbiddenDatabase(f"absolute paths are not accepted: {SQLITE_NAME_RULE}")
    if "/" in database or "\\" in database:
        raise ForbiddenDatabase(f"paths with folders are not accepted: {SQLITE_NAME_RULE}")
    if not SQLITE_NAME.match(database):
        raise ForbiddenDatabase(f"not a plain file name: {SQLITE_NAME_RULE}")


def sqlite_folder(root: Path, tenant: str) -> Path:
    """`tenant`'s folder of SQLite databases under `root`: the tenant id itself when it is
    a plain one ([a-z0-9_-]), else '~' and its UTF-8 bytes in hex (a hash when long), so
    that no tenant id can name a path outside `root` or another tenant's folder."""
    if _PLAIN_TENANT.match(tenant):
        return root / tenant
    encoded = tenant.encode().hex()
    if len(encoded) > 128:  # within any file system's name limit
        encoded = "sha256-" + hashlib.sha256(tenant.encode()).hexdigest()
    return root / f"~{encoded}"


def connect_arguments(url: URL) -> dict[str, Any]:
    """The keyword arguments the driver is called with for `url` (the query's parameters included);
    raises UnsupportedDatabase for a parameter that is not accepted."""
    from sqlalchemy.exc import ArgumentError

    unknown = sorted(set(url.query) - POSTGRES_QUERY_PARAMETERS)
    if unknown:
        raise UnsupportedDatabase(
            f"connection string parameter {shown(unknown[0], 40)} is not accepted; "
            f"accepted: {', '.join(sorted(POSTGRES_QUERY_PARAMETERS))}"
        )
    try:
        _, arguments = url.get_dialect()().create_connect_args(url)
    except (ArgumentError, ValueError) as exc:
        raise UnsupportedDatabase(f"cannot use the connection string: {exc}") from exc
    return dict(arguments)


def postgres_targets(arguments: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The (host, port) pairs a PostgreSQL connection with these driver arguments goes to;
    UnsupportedDatabase when the driver would find one elsewhere (a Unix socket, the environment)."""
    given = arguments.get("host")
    listed = list(given) if isinstance(given, list | tuple) else [given]
    hosts = [host for host in listed if isinstance(host, str) and host]
    if not hosts or len(hosts) != len(listed):
        raise UnsupportedDatabase("a postgresql connection string needs a host: postgresql://user@host:5432/db")
    if any(host.startswith("/") for host in hosts):
        raise UnsupportedDatabase("Unix sockets are not accepted: give a host name or address")
    given_ports = arguments.get("port", DEFAULT_POSTGRES_PORT)
    ports = list(given_ports) if isinstance(given_ports, list | tuple) else [given_ports] * len(hosts)
    try:
        numbers = [int(port) for port in ports]
    except (TypeError, ValueError):
        raise UnsupportedDatabase("a port in the connection string is not a number") from None
    if len(numbers) != len(hosts) or not all(0 < port < 65536 for port in numbers):
        raise UnsupportedDatabase("give one port from 1 to 65535 for each host")
    return list(zip(hosts, numbers, strict=True))


def tenant_options(arguments: Mapping[str, Any]) -> tuple[str, bool]:
    """The sslmode and direct_tls of a tenant's PostgreSQL connection; UnsupportedDatabase when the
    user or the database is missing (the driver would take the server's own) or an option is invalid."""
    for key, part in (("user", "a user"), ("database", "a database")):
        value = arguments.get(key)
        if not isinstance(value, str) or not value:
            raise UnsupportedDatabase(
                f"a postgresql connection string needs {part}: postgresql://user:password@host:5432/database"
            )
    mode = arguments.get("ssl", DEFAULT_SSL_MODE)
    if not isinstance(mode, str) or mode.lower() not in SSL_MODES:
        raise UnsupportedDatabase(f"ssl must be one of {', '.join(SSL_MODES)}")
    direct = arguments.get("direct_tls", False)
    if isinstance(direct, str):
        if direct.lower() not in _TRUE | _FALSE:
            raise UnsupportedDatabase("direct_tls must be true or false")
        direct = direct.lower() in _TRUE
    if direct and mode.lower() not in ("require", "verify-ca", "verify-full"):
        raise UnsupportedDatabase("direct_tls needs ssl=require, verify-ca or verify-full")
    return mode.lower(), bool(direct)


class _CheckedAddressTLS(ssl.SSLContext):
    """TLS on a connection made to a checked address: the handshake uses the host name the
    address was resolved from (server name; certificate check when check_hostname is on)."""

    names: Mapping[str, str] = {}

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        # asyncio passes the address it connected to; the driver cannot be given another name.
        if isinstance(server_hostname, str):
            server_hostname = self.names.get(server_hostname, server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def tls_context(mode: str, names: Mapping[str, str]) -> ssl.SSLContext | Literal[False]:
    """The TLS context of a tenant's connection for sslmode `mode` (False: none): never a client
    certificate, the system's CAs for verify-ca/verify-full, `names` mapping addresses to host names."""
    if mode == "disable":
        return False
    context = _CheckedAddressTLS(ssl.PROTOCOL_TLS_CLIENT)
    context.names = dict(names)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ssl.HAS_ALPN:  # what PostgreSQL 17 expects with direct TLS; ignored otherwise
        context.set_alpn_protocols(["postgresql"])
    if mode in ("verify-ca", "verify-full"):
        context.load_default_certs()
        context.check_hostname = mode == "verify-full"
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def pin_connection(arguments: dict[str, Any], allowlist: frozenset[str]) -> bool:
    """Make `arguments` a tenant's connection (see the module docstring): check each target host
    against the SSRF guard and point them at the checked addresses, set the TLS context and every
    option the driver would otherwise read from the server's environment or home directory.
    Whether TLS is optional (prefer, allow); raises TargetRefused, TargetUnresolvable or
    UnsupportedDatabase."""
    targets = postgres_targets(arguments)
    mode, direct = tenant_options(arguments)
    hosts: list[str] = []
    names: dict[str, str] = {}  # checked address -> the host name it came from
    for host, port in targets:
        address = await resolve_host(host, port, allowlist, remedy="--sql-allowlist")
        if address is None:  # an address already, or an allowlisted name: connected to as given
            hosts.append(host)
            continue
        # Two names on one address: TLS only sees the address, so the first name is used for both.
        names.setdefault(address, host)
        hosts.append(address)
    ports = [port for _, port in targets]
    # Explicit ports, so that PGPORT in the server's environment does not pick another one.
    arguments["host"], arguments["port"] = (hosts[0], ports[0]) if len(hosts) == 1 else (hosts, ports)
    if arguments.get("password") is None:
        # Not None, or the driver would take the server's own (PGPASSWORD, ~/.pgpass) for a tenant's connection.
        arguments["password"] = ""
    # A context, never a mode name: from a name the driver loads ~/.postgresql or PGSSLCERT's client certificate.
    arguments["ssl"] = tls_context(mode, names)
    arguments["direct_tls"] = direct
    # Each given, so that PGTARGETSESSIONATTRS, PGKRBSRVNAME and PGGSSLIB are not read.
    arguments.setdefault("target_session_attrs", "any")
    arguments["krbsrvname"] = "postgres"
    arguments["gsslib"] = "sspi" if platform.system() == "Windows" else "gssapi"
    return mode in ("prefer", "allow")


def open_nofollow(path: Path) -> None:
    """Create the SQLite file `path` if it is missing; ForbiddenDatabase when it or its folder is a
    symbolic link, or it is not a regular file. Python's sqlite3 cannot pass SQLITE_OPEN_NOFOLLOW,
    so this runs just before SQLite opens the same path."""
    if path.parent.is_symlink():
        raise ForbiddenDatabase("this SQLite database is a symbolic link, which is not opened")
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ForbiddenDatabase("this SQLite database is a symbolic link, which is not opened") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ForbiddenDatabase("this SQLite database is not a regular file")
    finally:
        os.close(descriptor)


# sqlite3's authorizer: the action code of a PRAGMA, and the answers.
_SQLITE_PRAGMA, _SQLITE_OK, _SQLITE_DENY = 19, 0, 1
# Pragmas a node's statement may give an argument: reads of a schema object, and foreign_keys.
# Any other with an argument sets something of the connection (its size bound among them).
_PRAGMA_ARGUMENTS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "table_list",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "foreign_key_check",
        "foreign_keys",
    }
)


def _authorize_sqlite(action: int, first: str | None, second: str | None, schema: str | None, _: str | None) -> int:
    """Refuse a pragma that sets something (PRAGMA x = v, PRAGMA x(v)) on a tenant's SQLite connection."""
    if action == _SQLITE_PRAGMA and second is not None and (first or "").lower() not in _PRAGMA_ARGUMENTS:
        return _SQLITE_DENY
    return _SQLITE_OK


def _pool_sizes(url: URL, pool_size: int, max_overflow: int) -> dict[str, int]:
    """The pool sizes an engine of `url` gets for those asked: at most SQLITE_POOL_CONNECTIONS
    for a SQLite file, MAX_POOL_CONNECTIONS otherwise, overflow included."""
    most = SQLITE_POOL_CONNECTIONS if url.get_backend_name() == "sqlite" else MAX_POOL_CONNECTIONS
    size = max(1, min(pool_size, most))
    return {"pool_size": size, "max_overflow": max(0, min(max_overflow, most - size))}


def _oldest_beyond(held: Mapping[tuple[str, str], object], tenant: str, most: int) -> list[tuple[str, str]]:
    """The keys of `tenant`'s pools in `held` (least recently used first) past its newest `most`."""
    owned = [key for key in held if key[0] == tenant]
    return owned[: max(0, len(owned) - most)]


def _databases_in(folder: Path) -> set[str]:
    """The SQLite databases in a tenant's folder (their -wal, -shm and -journal files left out)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return set()
    return {name for name in names if not name.endswith(("-wal", "-shm", "-journal"))}


def _guarded_engine(url: URL, options: dict[str, Any], allowlist: frozenset[str]) -> AsyncEngine:
    """A new engine for `url`, each of its connections checked as `_guard` says."""
    from sqlalchemy.ext.asyncio import create_async_engine

    return _guard(create_async_engine(url, **options), allowlist)


def _guard(engine: AsyncEngine, allowlist: frozenset[str]) -> AsyncEngine:
    """Send every new connection of a PostgreSQL `engine` through `pin_connection`, and of a
    SQLite file engine through `open_nofollow`."""
    from sqlalchemy import event
    from sqlalchemy.util import await_only

    if engine.url.get_backend_name() == "sqlite":
        memory = _sqlite_memory(engine.url)
        if not memory:
            path = Path(str(engine.url.database))

            def check(dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
                open_nofollow(path)

            event.listen(engine.sync_engine, "do_connect", check)
        most = SQLITE_MEMORY_BYTES if memory else SQLITE_FILE_BYTES

        def bound(connection: Any, record: Any) -> None:
            # Before any statement of the node's: past it, writes fail as on a full disk. The temp
            # schema (TEMP tables, on disk or in memory) too. Then the node's statements may set no
            # pragma that would lift it (or any other setting of the connection's).
            cursor = connection.cursor()
            try:
                for schema in ("main", "temp"):
                    cursor.execute(f"PRAGMA {schema}.page_size")
                    (page_size,) = cursor.fetchone()
                    cursor.execute(f"PRAGMA {schema}.max_page_count = {most // int(page_size)}")
            finally:
                cursor.close()
            await_only(connection.driver_connection.set_authorizer(_authorize_sqlite))
            # aiosqlite has no setlimit: it runs on the connection's own thread, as its calls do
            # (an aiosqlite without these attributes fails the connection: no unbounded SQLite).
            driver = connection.driver_connection
            await_only(driver._execute(driver._conn.setlimit, sqlite3.SQLITE_LIMIT_LENGTH, SQLITE_MAX_VALUE_BYTES))

        event.listen(engine.sync_engine, "connect", bound)
        return engine

    def connect(dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        # Runs inside SQLAlchemy's greenlet (the driver's connect is awaited the same way).
        optional_tls = await_only(pin_connection(cparams, allowlist))
        if not optional_tls:
            return None  # SQLAlchemy connects with the arguments as they are now
        try:
            return dialect.connect(*cargs, **cparams)
        except (TimeoutError, ConnectionRefusedError):
            raise
        except OSError:
            # The server refused TLS or its handshake failed: prefer and allow go on without it, as libpq does.
            cparams["ssl"] = False
            return dialect.connect(*cargs, **cparams)

    event.listen(engine.sync_engine, "do_connect", connect)
    return engine


def describe(connection_string: str) -> str:
    """The connection string with its password hidden (for messages and logs)."""
    try:
        return async_url(connection_string).render_as_string(hide_password=True)
    except UnsupportedDatabase:
        return connection_string.split("://", 1)[0] + "://…"


class SqlPools:
    """Process-wide async engines keyed by tenant and (normalised) connection string.

    Per tenant: pooled connections keep session state (temporary tables,
    settings), and an in-memory SQLite database is one connection, so a
    shared engine would let one tenant's workflows read what another's
    left behind. SQLite files are found in `sqlite_folder(sqlite_root,
    tenant)`; without a `sqlite_root` only `:memory:` is open to nodes.
    """

    def __init__(
        self,
        allowlist: frozenset[str] = frozenset(),
        *,
        sqlite_root: Path | None = None,
        max_engines_per_tenant: int = MAX_ENGINES_PER_TENANT,
        max_engines: int = MAX_ENGINES,
    ) -> None:
        # Hosts/addresses PostgreSQL connections may reach though internal (--sql-allowlist).
        self.allowlist = normalize_allowlist(allowlist)
        self.sqlite_root = sqlite_root
        self._max_per_tenant = max_engines_per_tenant
        self._max_engines = max_engines
        # Least recently used first.
        self._engines: OrderedDict[tuple[str, str], AsyncEngine] = OrderedDict()
        # Pools of named resources (server/resources/): (tenant, name) -> (settings fingerprint, engine).
        self._resources: OrderedDict[tuple[str, str], tuple[str, AsyncEngine]] = OrderedDict()  # LRU first
        self._disposing: set[asyncio.Task[None]] = set()
        # Statements running on each engine, and engines dropped (replaced, evicted) while in use.
        self._users: dict[AsyncEngine, int] = {}
        self._retired: set[AsyncEngine] = set()
        # SQLite names each tenant was given, whether their files exist yet or not: a file is made by
        # its first connection, later, so counting the folder alone lets concurrent runs past the cap.
        self._sqlite_names: dict[str, set[str]] = {}

    def engine(
        self,
        connection_string: str,
        pool_size: int = 5,
        max_overflow: int = 10,
        pool_recycle: int = 3600,
        *,
        tenant: str = "",
        echo: bool = False,
    ) -> AsyncEngine:
        """The engine of `tenant` for `connection_string`, created on first use (with `pool_pre_ping`);
        run statements on it inside `using`, or it may be disposed when it is dropped from the cache.
        Raises UnsupportedDatabase (ForbiddenDatabase: a SQLite file outside the tenant's folder)."""
        url = self.tenant_url(async_url(connection_string), tenant)
        key = (tenant, url.render_as_string(hide_password=False))
        engine = self._engines.get(key)
        if engine is not None:
            self._engines.move_to_end(key)
            return engine
        options: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": pool_recycle, "echo": echo}
        if not _sqlite_memory(url):  # in-memory SQLite uses one static connection, no pool sizes
            options.update(_pool_sizes(url, pool_size, max_overflow))
        engine = _guarded_engine(url, options, self.allowlist)
        self._engines[key] = engine
        self._evict(tenant)
        return engine

    def _evict(self, tenant: str) -> None:
        """Drop the least recently used engines beyond the caps (the tenant's, then the overall one)."""
        for key in _oldest_beyond(self._engines, tenant, self._max_per_tenant):
            self._retire(self._engines.pop(key))
        while len(self._engines) > self._max_engines:
            _, engine = self._engines.popitem(last=False)
            self._retire(engine)

    def tenant_url(self, url: URL, tenant: str) -> URL:
        """`url` with a SQLite file name placed in `tenant`'s folder (created on first use); other URLs
        unchanged. Raises ForbiddenDatabase."""
        if url.get_backend_name() != "sqlite" or _sqlite_memory(url):
            return url
        check_sqlite(url)
        if self.sqlite_root is None:
            raise ForbiddenDatabase("this server keeps no SQLite files for workflows: use sqlite:///:memory:")
        root = self.sqlite_root
        folder = sqlite_folder(root, tenant)
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ForbiddenDatabase(f"cannot make the tenant's SQLite folder: {exc.strerror}") from None
        path = folder / str(url.database)
        # The tenant's folder and the file as they are, never a link elsewhere (checked again at each connection).
        if folder.is_symlink() or not folder.is_dir() or path.is_symlink():
            raise ForbiddenDatabase("this SQLite database is a symbolic link, which is not opened")
        given = self._sqlite_names.setdefault(tenant, set())
        new_file = path.name not in given and not path.exists()
        if new_file and len(given | _databases_in(folder)) >= SQLITE_FILES_PER_TENANT:
            raise ForbiddenDatabase(
                f"this tenant keeps its most of {SQLITE_FILES_PER_TENANT} SQLite databases: use one of them"
            )
        real = path.resolve()
        if real.parent != folder.resolve():
            raise ForbiddenDatabase(f"not in the tenant's folder: {SQLITE_NAME_RULE}")
        given.add(path.name)
        return url.set(database=str(real))

    def resource_engine(
        self,
        tenant: str,
        name: str,
        fingerprint: str,
        connection_string: str,
        *,
        pool_size: int,
        max_overflow: int,
        pool_recycle: int,
    ) -> AsyncEngine:
        """The pool of `tenant`'s resource `name`, shared by all its executions; use it inside `using`.

        A different `fingerprint` (the resource or a secret in it changed)
        replaces the pool: the old one is retired, and disposed once the
        last statement running on it has finished. Raises UnsupportedDatabase
        (ForbiddenDatabase: a SQLite file outside the tenant's folder).
        """
        key = (tenant, name)
        held = self._resources.get(key)
        if held is not None and held[0] == fingerprint:
            self._resources.move_to_end(key)
            return held[1]
        url = self.tenant_url(async_url(connection_string), tenant)
        options: dict[str, Any] = {"pool_pre_ping": True, "pool_recycle": pool_recycle}
        if not _sqlite_memory(url):
            # pool_timeout: a waiter gives up after the SQL node's own deadline, not SQLAlchemy's 30 s.
            options.update(_pool_sizes(url, pool_size, max_overflow), pool_timeout=3600)
        engine = _guarded_engine(url, options, self.allowlist)
        self._resources[key] = (fingerprint, engine)
        self._resources.move_to_end(key)
        if held is not None:
            self._retire(held[1])
        for other in _oldest_beyond(self._resources, tenant, MAX_RESOURCE_POOLS_PER_TENANT):
            self._retire(self._resources.pop(other)[1])
        return engine

    @contextlib.asynccontextmanager
    async def using(self, engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
        """Hold `engine` while a statement runs on it: a retired pool (a replaced resource's, an engine
        dropped from the cache) is disposed only after its last user, so its connections are closed,
        not left to the garbage collector, and never under a running statement."""
        self._users[engine] = self._users.get(engine, 0) + 1
        try:
            yield engine
        finally:
            self._users[engine] -= 1
            if not self._users[engine]:
                del self._users[engine]
                if engine in self._retired:
                    self._retired.discard(engine)
                    self._dispose_later(engine)

    def is_current(self, engine: AsyncEngine) -> bool:
        """Whether `engine` is still some resource's pool (not retired)."""
        return any(held is engine for _, held in self._resources.values())

    def discard_resource(self, tenant: str, name: str) -> bool:
        """Retire the pool of a deleted or changed resource; False when this process had none."""
        held = self._resources.pop((tenant, name), None)
        if held is not None:
            self._retire(held[1])
        return held is not None

    def resource_pools(self) -> list[tuple[str, str, str, AsyncEngine]]:
        """(tenant, name, fingerprint, engine) of every open resource pool."""
        return [(tenant, name, fp, engine) for (tenant, name), (fp, engine) in self._resources.items()]

    def _retire(self, engine: AsyncEngine) -> None:
        if self._users.get(engine):
            self._retired.add(engine)
        else:
            self._dispose_later(engine)

    def _dispose_later(self, engine: AsyncEngine) -> None:
        task = asyncio.get_running_loop().create_task(engine.dispose())
        self._disposing.add(task)
        task.add_done_callback(self._disposing.discard)

    def __len__(self) -> int:
        return len(self._engines) + len(self._resources)

    async def close(self) -> None:
        """Dispose every engine (closing pooled connections); later calls create new ones."""
        engines = [*self._engines.values(), *(engine for _, engine in self._resources.values()), *self._retired]
        self._engines, self._resources, self._retired = OrderedDict(), OrderedDict(), set()
        for engine in engines:
            await engine.dispose()
        await asyncio.gather(*self._disposing, return_exceptions=True)


def _sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
