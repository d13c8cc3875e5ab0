"""`flowport upstreams list|set|add|remove`: the servers a running `flowport up`'s Envoy sends calls to.

The commands rewrite the endpoints files in `<data-dir>/endpoints/`
(server/endpoint_files.py), which that Envoy watches, and then wait until its
admin shows the new servers: no restart, and no connection dropped. They find
the Envoy by the admin port `flowport up` wrote there, and check it is the
one running that data dir's config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowport.clients.cli.api_command import add_action, add_group
from flowport.clients.cli.connect import EXIT_API_ERROR, EXIT_UNREACHABLE, EXIT_USAGE, CliError
from flowport.server.endpoint_files import ENDPOINTS_DIR, EndpointFilesError, Servers, changing, read, write
from flowport.server.settings import Settings, SettingsError
from flowport.server.upstreams import Upstream, parse_upstream
from flowport.transcoder.envoy_routes import CLUSTER

# How long Envoy may take to apply a file (it reads one as soon as it is renamed into place).
APPLY_TIMEOUT = 10.0
POLL = 0.1
EPILOG = """\
flowport up writes its servers to <data-dir>/endpoints/ and its Envoy watches
them: a change applies at once, without restarting Envoy. Connections to the
servers that stay are kept; a server added gets calls once it passes its
health check; one removed gets no new calls, and the calls and streams under
way on it finish (stop it afterwards: SIGTERM, and it drains). The change
lasts until flowport up restarts, which starts from its --upstream flags again.
Changes made at once take turns, each starting from what the one before wrote.
Only addresses change so: with --upstream-dns, Envoy resolves the names itself.

exit codes: 0 done; 1 Envoy did not apply the change in time (see its log);
2 bad usage or settings, or a change refused (a name, a server given twice,
none left, an Envoy on --upstream-dns); 3 no flowport up runs on the data dir."""


def add_upstreams_parser(commands: Any) -> None:
    """Add `upstreams` and its actions to the top-level subparsers."""
    help_text = "list or change the servers a running flowport up's Envoy sends calls to (no restart)"
    actions = add_group(commands, "upstreams", help_text, epilog=EPILOG)
    _action(actions, "list", "each server of Envoy's cluster: address, local or upstream, health")
    for name, help_text in (
        ("set", "make these the upstreams (flowport up's own servers stay)"),
        ("add", "add these upstreams"),
        ("remove", "remove these upstreams; calls and streams under way on them finish"),
    ):
        action = _action(actions, name, help_text)
        action.add_argument(
            "servers",
            nargs="*" if name == "set" else "+",
            metavar="HOST:PORT",
            help="a flowport serve's gRPC address, IPv6 in brackets"
            + ("; none leaves only flowport up's own servers" if name == "set" else ""),
        )


def _action(actions: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = add_action(actions, name, help_text, EPILOG)
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="flowport up's data dir (env FLOWPORT_DATA_DIR)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file with settings (env FLOWPORT_CONFIG)")
    return parser


def run_upstreams(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run one `flowport upstreams` action; returns the exit code."""
    try:
        data_dir = Settings.load({"data_dir": args.data_dir}, config_file=args.config).data_dir
        directory = data_dir / ENDPOINTS_DIR
        if args.upstreams_command == "list":
            servers = read(directory)
            _list(servers, _Admin(servers.admin_port, data_dir), out)
            return 0
        given = _parsed(args.servers)

        def waiting() -> None:
            print("flowport: waiting for another change of the upstreams to end", file=sys.stderr)

        with changing(directory, waiting):  # another change under way ends first, then this one reads its result
            servers = read(directory)
            admin = _Admin(servers.admin_port, data_dir)
            servers.check_reloadable()
            changed = servers.with_upstreams(_wanted(servers, args.upstreams_command, given))
            admin.check()  # before writing: files no Envoy reads would change nothing
            write(directory, changed)
            admin.wait_for(changed)
    except (SettingsError, EndpointFilesError) as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return exc.code
    before, after = {str(u) for u in servers.upstreams}, [str(u) for u in changed.upstreams]
    added = [u for u in after if u not in before]
    removed = [str(u) for u in servers.upstreams if str(u) not in after]
    out(f"upstreams: {', '.join(after) or 'none'}")
    if added:
        out(f"added: {', '.join(added)} (calls go to each once it passes its health check)")
    if removed:
        out(f"removed: {', '.join(removed)} (no new calls; those under way finish)")
    return 0


def _parsed(texts: list[str]) -> list[Upstream]:
    parsed = []
    for text in texts:
        try:
            name = parse_upstream(text, by_name=True)
        except ValueError:
            pass
        else:
            raise EndpointFilesError(
                f"{name} is a name: flowport upstreams changes addresses (Envoy resolves --upstream-dns names)"
            )
        try:
            parsed.append(parse_upstream(text, by_name=False))
        except ValueError as exc:
            raise EndpointFilesError(str(exc)) from None
    return parsed


def _wanted(servers: Servers, command: str, given: list[Upstream]) -> list[Upstream]:
    current = list(servers.upstreams)
    if command == "set":
        return given
    if command == "add":
        present = [str(u) for u in given if u in current]
        if present:
            raise EndpointFilesError(f"already an upstream: {', '.join(present)}")
        return current + given
    absent = [str(u) for u in given if u not in current]
    if absent:
        listed = ", ".join(str(u) for u in current) or "none"
        raise EndpointFilesError(f"not an upstream: {', '.join(absent)} (the upstreams are {listed})")
    return [u for u in current if u not in given]


def _list(servers: Servers, admin: _Admin, out: Callable[[str], None]) -> None:
    hosts: dict[str, dict[str, Any]] | None
    try:
        admin.check()
        hosts = admin.hosts()
    except CliError as exc:
        hosts = None
        print(f"flowport: warning: {exc}; the servers last written:", file=sys.stderr)
    rows = [(str(Upstream(h, p, by_name=False)), "local") for h, p in servers.local_grpc]
    rows += [(str(u), "upstream") for u in servers.upstreams]
    rows += [(str(u), "upstream (DNS name)") for u in servers.names]
    width = max((len(address) for address, _ in rows), default=0)
    for address, kind in rows:
        health = "" if hosts is None or kind.endswith("name)") else _health(hosts.get(address))
        out(f"{address:<{width}}  {kind:<8}  {health}".rstrip())


def _health(status: dict[str, Any] | None) -> str:
    if status is None:
        return "not in Envoy's cluster"
    if status.get("failed_active_health_check"):
        return "failing its health check" if not status.get("pending_active_hc") else "not checked yet"
    if status.get("failed_outlier_check"):
        return "ejected (outlier detection)"
    return "healthy"


class _Admin:
    """The Envoy `flowport up` runs for a data dir, through its admin on 127.0.0.1."""

    def __init__(self, port: int, data_dir: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.config = (data_dir / "envoy.json").resolve()
        self.data_dir = data_dir

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as response:  # noqa: S310 - loopback admin
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            raise CliError(
                f"Envoy's admin ({self.url}) does not answer: is flowport up running with --data-dir {self.data_dir}?",
                EXIT_UNREACHABLE,
            ) from None

    def check(self) -> None:
        """CliError unless the Envoy at the admin port runs this data dir's config."""
        info = self._get("/server_info")
        running = info.get("command_line_options", {}).get("config_path", "")
        if not running or Path(running).resolve() != self.config:
            raise CliError(
                f"the Envoy on {self.url} runs another config than {self.config}: is flowport up running with "
                f"--data-dir {self.data_dir}?",
                EXIT_UNREACHABLE,
            )

    def hosts(self) -> dict[str, dict[str, Any]]:
        """Each server of Envoy's cluster, as HOST:PORT, and its health status."""
        clusters = self._get("/clusters?format=json").get("cluster_statuses", [])
        cluster: dict[str, Any] = next((c for c in clusters if c.get("name") == CLUSTER), {})
        found: dict[str, dict[str, Any]] = {}
        for host in cluster.get("host_statuses", []):
            address = host["address"]["socket_address"]
            found[str(Upstream(address["address"], int(address["port_value"]), by_name=False))] = host.get(
                "health_status", {}
            )
        return found

    def wait_for(self, servers: Servers) -> None:
        """Until Envoy's cluster holds exactly `servers`; CliError after APPLY_TIMEOUT."""
        wanted = {str(Upstream(h, p, by_name=False)) for h, p in servers.local_grpc}
        wanted |= {str(u) for u in servers.upstreams}
        deadline = time.monotonic() + APPLY_TIMEOUT
        while set(self.hosts()) != wanted:
            if time.monotonic() > deadline:
                raise CliError(
                    f"Envoy did not apply {self.data_dir / ENDPOINTS_DIR} within {APPLY_TIMEOUT:g}s (its log says why)",
                    EXIT_API_ERROR,
                )
            time.sleep(POLL)
