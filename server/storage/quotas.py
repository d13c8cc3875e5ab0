"""How much of each kind of object one tenant may keep in the shared store.

Without a cap, one tenant with a valid key could fill the disk every tenant
shares with workflow versions, webhooks, services, resources, secrets or (its
admins) API keys
(executions are counted in bytes instead: server/engine/execution_bytes.py).
Webhooks have a smaller cap of their own, since every event is delivered to
each webhook that wants it. Resources from the
operator's resources file are never refused, and count with the tenant's own
toward the cap.
Each create counts the tenant's rows of its kind after its own write, in the
same transaction: over the cap, it raises and its write is rolled back, so an
upsert that only replaces a row never counts twice. On SQLite one writer
makes the cap exact; on PostgreSQL, each process's writer running one
transaction at a time, processes creating at the same moment can each take
the last place: at most one row per process beyond the cap.

Counted per kind, by the primary key's tenant prefix, so a count reads at
most the cap's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flowport.server.errors import ResourceExhausted

if TYPE_CHECKING:  # tables.py holds a TenantQuotas
    from flowport.server.storage.tables import Connection


@dataclass(frozen=True)
class Kind:
    """One kind of object a tenant keeps: its table (every row of the tenant's counts)."""

    table: str
    name: str  # as the error says it, plural
    column: str = "body"  # what holds a row's bulk, counted toward the tenant's bytes of the kind


WORKFLOW_VERSIONS = Kind(
    "workflows",
    "workflow versions (deleted ones count until the purge removes them, an hour after their deletion "
    "once no execution of theirs is running)",
)
WEBHOOKS = Kind("webhooks", "webhooks")
SERVICES = Kind("services", "registered services (expired ones count until the purge removes them, within a minute)")
RESOURCES = Kind("resources", "resources")
SECRETS = Kind("secrets", "secrets", column="sealed")
API_KEYS = Kind(
    "api_keys", "API keys (revoked and expired ones count until the purge removes them, 30 days after their end)"
)


@dataclass(frozen=True)
class TenantQuotas:
    """The caps a store enforces; None: no cap (a store opened outside the server, in tests)."""

    objects: int | None = None
    """Rows of each kind one tenant may keep (`--tenant-max-objects`)."""
    sessions: int | None = None
    """Sessions one tenant may keep (`--tenant-max-sessions`), counted every SESSION_SAMPLE creates."""
    webhooks: int | None = None
    """Webhooks one tenant may keep (`--tenant-max-webhooks`): each event is delivered once to each
    webhook that wants it, so this bounds what one event costs."""
    object_bytes: int | None = None
    """Bytes the rows of each kind of one tenant may take (`--tenant-max-object-bytes`): counts alone
    would let 10,000 workflow versions of 4 MiB each take 40 GB."""

    def limit(self, kind: Kind) -> tuple[int | None, str]:
        """The cap on `kind`, and the setting that sets it."""
        if kind is SESSIONS:
            return self.sessions, "tenant_max_sessions"
        if kind is WEBHOOKS:
            return self.webhooks, "tenant_max_webhooks"
        return self.objects, "tenant_max_objects"


SESSIONS = Kind(
    "sessions",
    "sessions (expired and deleted ones count until the purge removes them)",
)
# Sessions are created far more often than the other kinds, and a tenant may keep many: one
# create in this many is counted, in each process (the first one, and every one while over).
SESSION_SAMPLE = 64
# Tenants whose creates since their last count a process remembers; past it, it starts again.
SESSION_TENANTS_TRACKED = 65_536


def check(conn: Connection, quotas: TenantQuotas, tenant: str, kind: Kind, *, rows: bool = True) -> None:
    """Raise ResourceExhausted (reason TENANT_QUOTA) when `tenant` keeps more rows of `kind` than its
    cap, or rows that take more bytes, counting the row just written; called inside the write,
    after it. `rows=False` checks the bytes alone: a row rewritten larger adds no row."""
    limit, setting = quotas.limit(kind) if rows else (None, "")
    most = quotas.object_bytes
    if limit is None and most is None:
        return
    # length() reads each row's size from its header, never the value itself (on either engine).
    sql = f"SELECT count(*), coalesce(sum(length({kind.column})), 0) FROM {kind.table} WHERE tenant=?"  # noqa: S608
    count, size = conn.execute(sql, (tenant,)).fetchone()
    if most is not None and int(size) > most:
        raise ResourceExhausted(
            f"this tenant's {kind.name} take their most of {most} bytes; delete some first",
            reason="TENANT_QUOTA",
            metadata={"kind": kind.table, "tenant_max_object_bytes": str(most)},
        )
    if limit is not None and int(count) > limit:
        raise ResourceExhausted(
            f"this tenant keeps its most of {limit} {kind.name}; delete some first",
            reason="TENANT_QUOTA",
            metadata={"kind": kind.table, setting: str(limit)},
        )


class SessionSampler:
    """Which session creates count the tenant's sessions: the first of a tenant in this process,
    then one in SESSION_SAMPLE, and every one while the last count was over the cap."""

    def __init__(self) -> None:
        self._since: dict[str, int] = {}

    def due(self, tenant: str) -> bool:
        """Whether this create (about to be written) is counted."""
        since = self._since.get(tenant)
        if since is None or since + 1 >= SESSION_SAMPLE:
            return True
        self._since[tenant] = since + 1
        return False

    def counted(self, tenant: str, over: bool) -> None:
        """A count was made: over the cap, the next create is counted again."""
        if len(self._since) >= SESSION_TENANTS_TRACKED and tenant not in self._since:
            self._since.clear()
        self._since[tenant] = SESSION_SAMPLE - 1 if over else 0
