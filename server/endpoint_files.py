"""The servers `flowport up`'s Envoy sends calls to, in files Envoy watches: changed without restarting it.

Before it starts Envoy, `flowport up` writes `<data-dir>/endpoints/`:
`flowport_grpc.json` and (with --websocket-port) `flowport_ws.json`, the
endpoints of the cluster of that name as an EDS answer (a DiscoveryResponse
of one ClusterLoadAssignment) that the bootstrap names in place of inline
endpoints; and `servers.json`, what they are made of (its own server
processes, the --upstream servers, the WebSocket port of those, Envoy's
admin port). `flowport upstreams` writes them again with other upstreams.

Envoy watches the directory for a file moved onto one of those names (only a
rename is atomic: a file written in place could be read half-written), so
each is written beside its name and renamed over it. Envoy applies it on its
own: connections to the servers that stay are kept, a server added gets
calls once it passes its health check, and one removed gets no new calls
while those under way on it, streams included, finish.

With --upstream-dns the servers stay in the bootstrap (STRICT_DNS: Envoy
resolves the names and follows their answers) and only `servers.json` is
written, so `flowport upstreams` can say why it changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from flowport.server.datadir import write_private
from flowport.server.settings import Settings
from flowport.server.upstreams import Upstream, parse_upstream
from flowport.transcoder.envoy_routes import CLUSTER
from flowport.transcoder.upstream_endpoints import (
    assignment,
    bridge_endpoints,
    endpoints_file,
    local_grpc,
    local_websocket,
    server_endpoints,
)
from flowport.transcoder.websocket_routes import WEBSOCKET_CLUSTER

ENDPOINTS_DIR = "endpoints"  # under the data dir
SERVERS_FILE = "servers.json"
CHANGE_LOCK = ".change.lock"


class EndpointFilesError(Exception):
    """The endpoint files cannot be read or the change cannot be made; the message says why."""


@dataclass(frozen=True)
class Servers:
    """What Envoy's server clusters hold: `flowport up`'s own processes and the upstreams."""

    admin_port: int  # Envoy's, on 127.0.0.1
    local_grpc: tuple[tuple[str, int], ...] = ()
    local_websocket: tuple[tuple[str, int], ...] = ()
    websocket_port: int = 0  # each upstream host's bridge; 0: no /ws
    upstreams: tuple[Upstream, ...] = ()  # --upstream: addresses
    names: tuple[Upstream, ...] = ()  # --upstream-dns: Envoy resolves them, and they are in the bootstrap

    @classmethod
    def of(cls, settings: Settings) -> Servers:
        """The servers `settings` name."""
        return cls(
            admin_port=settings.admin_port,
            local_grpc=tuple(local_grpc(settings)),
            local_websocket=tuple(local_websocket(settings)),
            websocket_port=settings.websocket_port,
            upstreams=tuple(u for u in settings.upstreams if not u.by_name),
            names=tuple(u for u in settings.upstreams if u.by_name),
        )

    def check_reloadable(self) -> None:
        """EndpointFilesError when the servers are in Envoy's bootstrap (a name among them), not in the files."""
        if self.names:
            named = ", ".join(str(n) for n in self.names)
            raise EndpointFilesError(
                f"this Envoy resolves --upstream-dns {named} itself: its servers are in its bootstrap, and "
                "change with the DNS answers or a restart of flowport up"
            )

    def with_upstreams(self, upstreams: Sequence[Upstream]) -> Servers:
        """The same local servers with `upstreams` instead; EndpointFilesError when Envoy cannot take them so."""
        self.check_reloadable()
        if any(u.by_name for u in upstreams):
            raise EndpointFilesError("upstreams changed here are addresses: a name goes to --upstream-dns")
        given = [str(u) for u in upstreams]
        local = {str(Upstream(host, port, by_name=False)) for host, port in self.local_grpc}
        for n, upstream in enumerate(given):
            if upstream in given[:n]:
                raise EndpointFilesError(f"upstream {upstream} is given twice")
            if upstream in local:
                raise EndpointFilesError(f"upstream {upstream} is one of flowport up's own servers")
        if not upstreams and not self.local_grpc:
            raise EndpointFilesError("Envoy would have no server left: flowport up runs none of its own")
        return replace(self, upstreams=tuple(upstreams))

    def documents(self) -> dict[str, dict[str, Any]]:
        """Each endpoints file's name and content (none when a name keeps the servers in the bootstrap)."""
        if self.names:
            return {}
        clusters = {CLUSTER: server_endpoints(self.local_grpc, self.upstreams)}
        if self.websocket_port:
            clusters[WEBSOCKET_CLUSTER] = bridge_endpoints(self.local_websocket, self.upstreams, self.websocket_port)
        files: dict[str, dict[str, Any]] = {}
        for cluster, endpoints in clusters.items():
            # Envoy logs the version it applied: the content's digest tells two apart.
            version = hashlib.sha256(json.dumps(endpoints, sort_keys=True).encode()).hexdigest()[:16]
            files[endpoints_file(Path(), cluster).name] = assignment(cluster, endpoints, version)
        return files

    def to_json(self) -> str:
        """`servers.json`."""
        return json.dumps(
            {
                "admin_port": self.admin_port,
                "local_grpc": [list(a) for a in self.local_grpc],
                "local_websocket": [list(a) for a in self.local_websocket],
                "websocket_port": self.websocket_port,
                "upstream": [str(u) for u in self.upstreams],
                "upstream_dns": [str(u) for u in self.names],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Servers:
        """Read `servers.json`; ValueError (or KeyError, TypeError) when it is not one."""
        data = json.loads(text)
        return cls(
            admin_port=int(data["admin_port"]),
            local_grpc=tuple((str(h), int(p)) for h, p in data["local_grpc"]),
            local_websocket=tuple((str(h), int(p)) for h, p in data["local_websocket"]),
            websocket_port=int(data["websocket_port"]),
            upstreams=tuple(parse_upstream(u, by_name=False) for u in data["upstream"]),
            names=tuple(parse_upstream(u, by_name=True) for u in data["upstream_dns"]),
        )


def write(directory: Path, servers: Servers) -> None:
    """Write the endpoints files, then `servers.json`, each by a rename over the old one."""
    directory.mkdir(mode=0o700, exist_ok=True)
    for name, document in servers.documents().items():
        _replace(directory / name, json.dumps(document, indent=2))
    _replace(directory / SERVERS_FILE, servers.to_json())


def read(directory: Path) -> Servers:
    """The servers last written to `directory`; EndpointFilesError when there are none."""
    path = directory / SERVERS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EndpointFilesError(f"{path} does not exist: no flowport up has started with this --data-dir") from None
    except OSError as exc:
        raise EndpointFilesError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        return Servers.from_json(text)
    except (ValueError, KeyError, TypeError):
        raise EndpointFilesError(f"{path} is not a servers file flowport up wrote") from None


@contextlib.contextmanager
def changing(directory: Path, on_wait: Callable[[], object] | None = None) -> Iterator[None]:
    """Hold the directory's change lock, waiting for it: one `flowport upstreams` change at a time.

    Each change reads the servers, writes them changed and waits for Envoy to
    hold exactly those: two at once would each write over what the other read,
    one change would be lost, and each would wait for a set Envoy never holds.
    POSIX only (flock); on Windows changes are not serialized. `on_wait` is
    called when another change holds the lock, before waiting for it.
    """
    if sys.platform == "win32":
        yield
        return
    import fcntl

    if not directory.is_dir():  # nothing written here yet: `read` says so
        yield
        return
    try:
        fd = os.open(directory / CHANGE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise EndpointFilesError(f"{directory} is not writable: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when the fd closes, or the process ends
        yield
    finally:
        os.close(fd)


def _replace(path: Path, text: str) -> None:
    # Beside its name (one file system, so the rename is atomic), and unique to
    # this process, so two writers never share a half-written file.
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_private(partial, text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
