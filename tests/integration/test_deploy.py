"""deploy/: the Dockerfile, compose.yaml and the Kubernetes manifests, checked with what runs
here (no Docker, no Kubernetes). Each file is parsed and, where a schema exists, validated
against it; every setting a container gets is loaded as flowport loads it; the names, ports
and addresses that tie the files together are compared; the Envoy config each front door
renders passes `envoy --mode validate`; and the compose health checks run against a real
stack."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import secrets
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from flowport.clients.cli import build_parser, load_settings
from flowport.server.envoy_binary import find_envoy
from flowport.server.settings import ENV_PREFIX, Settings, SettingsError
from flowport.server.shutdown import SHUTDOWN_MARGIN
from flowport.transcoder.envoy_config import HEALTH_CHECK_PATH
from flowport.transcoder.envoy_routes import CLUSTER

from ..backends import free_port
from ..conftest import Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"flowport:{PYPROJECT['project']['version']}"
# What deploy/.env holds (README, "Several hosts"), made up.
DOTENV = {
    "FLOWPORT_ADMIN_API_KEY": secrets.token_hex(32),
    "FLOWPORT_SECRETS_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    "POSTGRES_PASSWORD": "not-a-real-password",
}
# ${NAME}, ${NAME:?message}, ${NAME:-default}: compose's interpolation.
_VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")
# What a container listens on, so that other containers reach it.
EVERY_ADDRESS = "0.0.0.0"  # noqa: S104
# The Kubernetes releases the manifests are checked against: the first with gRPC probes, the newest known.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def _dockerfile() -> list[tuple[str, str]]:
    """deploy/Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.strip().partition(" ") for line in joined.splitlines() if line.strip())
    ]


def _image() -> tuple[list[str], dict[str, str], list[tuple[str, str]]]:
    """The final stage's ENTRYPOINT + CMD, its environment, and its instructions."""
    instructions = _dockerfile()
    last = max(n for n, (kind, _) in enumerate(instructions) if kind == "FROM")
    final = instructions[last:]
    argv = [word for kind in ("ENTRYPOINT", "CMD") for k, args in final if k == kind for word in yaml.safe_load(args)]
    environment = dict(item.split("=", 1) for k, args in final if k == "ENV" for item in shlex.split(args))
    return argv, environment, final


def _settings(monkeypatch: pytest.MonkeyPatch, argv: list[str], environment: dict[str, Any]) -> Settings:
    """The settings `flowport <argv>` starts with in a container with `environment`, as flowport loads them."""
    unknown = [
        name
        for name in environment
        if name.startswith(ENV_PREFIX) and name.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    ]
    assert not unknown, f"not flowport settings: {unknown}"
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        if name.startswith(ENV_PREFIX):  # not the image's PATH
            monkeypatch.setenv(name, str(value))
    return load_settings(build_parser().parse_args(argv))


def _envoy_validates(argv: list[str], environment: dict[str, Any], tmp_path: Path) -> list[str]:
    """`flowport envoy-config` with a front door's flags and environment, passed through `envoy --mode
    validate`; returns the servers of its gRPC cluster as NAME:PORT."""
    assert argv[0] == "up", argv
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= {k: str(v) for k, v in environment.items() if k.startswith(ENV_PREFIX)}
    rendered = subprocess.run(
        [sys.executable, "-m", "flowport.clients.cli", "envoy-config", *argv[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    config = tmp_path / "envoy.json"
    config.write_text(rendered.stdout)
    validated = subprocess.run(
        [str(find_envoy(None)), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert validated.returncode == 0, validated.stdout + validated.stderr
    clusters = json.loads(rendered.stdout)["static_resources"]["clusters"]
    [grpc] = [c for c in clusters if c["name"] == CLUSTER]
    [group] = grpc["load_assignment"]["endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in group["lb_endpoints"]]
    return [f"{a['address']}:{a['port_value']}" for a in addresses]


def _stop_time(settings: Settings) -> float:
    """How long a server may take to stop after SIGTERM: its drain, the grace in-flight calls get,
    and the margin after which its own watchdog ends a stuck shutdown (server/shutdown.py)."""
    return settings.drain_seconds + settings.shutdown_grace + SHUTDOWN_MARGIN


def _compose() -> tuple[dict[str, Any], set[str]]:
    """compose.yaml with DOTENV interpolated, and the variables it asks for."""
    text = (DEPLOY / "compose.yaml").read_text()
    variables = set(_VARIABLE.findall(text))
    return yaml.safe_load(_VARIABLE.sub(lambda m: DOTENV[m.group(1)], text)), variables


@pytest.mark.timeout(60)
def test_the_image_is_built_from_the_wheel_sources_and_starts_flowport_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    instructions = _dockerfile()
    copied = {
        source.rstrip("/")
        for kind, args in instructions
        if kind == "COPY" and not args.startswith("--from")
        for source in shlex.split(args)[:-1]
    }
    # What the wheel is built from: pyproject, its readme and the package-dir folders.
    package_dirs = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    assert copied == {"pyproject.toml", PYPROJECT["project"]["readme"]} | {d.split("/")[0] for d in package_dirs}
    ignored = {line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines() if line[:1] not in "#"}
    assert not copied & ignored

    argv, environment, final = _image()
    # tini, then the console script pip installs.
    assert argv[:2] == ["tini", "--"]
    assert PYPROJECT["project"]["scripts"][argv[2]] == "flowport.clients.cli:main"
    assert build_parser().parse_args(argv[3:]).command == "serve"
    settings = _settings(monkeypatch, argv[3:], environment)
    assert settings.grpc_host == EVERY_ADDRESS
    assert settings.metrics_host == EVERY_ADDRESS
    assert settings.access_log == "-"  # Envoy's access log with the container's output
    # The venv the build stage installed into comes first on PATH (the health checks' python).
    venv = next(args.split()[-1] for kind, args in instructions if kind == "RUN" and "venv" in args)
    assert environment["PATH"].split(":")[0] == f"{venv}/bin"
    assert ("COPY", f"--from=build {venv} {venv}") in final
    [user] = [args for kind, args in final if kind == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    exposed = {int(port) for kind, args in final if kind == "EXPOSE" for port in args.split()}
    assert exposed == {settings.http_port, settings.grpc_port, settings.websocket_port, settings.metrics_port}


@pytest.mark.timeout(120)
def test_compose_runs_envoy_in_front_of_two_servers_on_shared_postgres_and_redis(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    schema = subprocess.run(
        ["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr
    compose, variables = _compose()
    # Every variable deploy/.env must set is one the README says how to make.
    readme = (ROOT / "README.md").read_text()
    assert variables == set(DOTENV)
    assert all(f"{name}=" in readme for name in variables)

    services = compose["services"]
    assert set(services) == {"postgres", "redis", "server-a", "server-b", "envoy"}
    command, image_environment, _ = _image()
    ours = {name for name, service in services.items() if service.get("image") == IMAGE}
    assert ours == {"server-a", "server-b", "envoy"}
    for name in ours:
        build = services[name]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert build["dockerfile"] == "deploy/Dockerfile"

    servers = {
        name: _settings(
            monkeypatch, services[name].get("command", command[3:]), image_environment | services[name]["environment"]
        )
        for name in ("server-a", "server-b")
    }
    server = servers["server-a"]
    assert servers["server-b"] == server
    assert server.grpc_host == EVERY_ADDRESS
    postgres = services["postgres"]["environment"]
    database = urlsplit(server.database_url.get_secret_value() if server.database_url else "")
    assert (database.hostname, database.username, database.password, database.path) == (
        "postgres",
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        "/" + postgres["POSTGRES_DB"],
    )
    assert urlsplit(server.redis_url.get_secret_value() if server.redis_url else "").hostname == "redis"
    # A stopped server gets more time than its own shutdown grace.
    assert int(services["server-a"]["stop_grace_period"].removesuffix("s")) > _stop_time(server)

    envoy = services["envoy"]
    edge = _settings(monkeypatch, envoy["command"], image_environment | envoy.get("environment", {}))
    assert edge.no_local_server
    assert edge.host == EVERY_ADDRESS
    assert sorted(edge.upstream_dns) == [f"{name}:{server.grpc_port}" for name in sorted(servers)]
    assert edge.websocket_port == server.websocket_port
    assert [port.split(":")[-1] for port in envoy["ports"]] == [str(edge.http_port)]
    # The servers trust X-Forwarded-For from Envoy's fixed address, on the network's subnet.
    address = envoy["networks"]["flowport"]["ipv4_address"]
    [subnet] = compose["networks"]["flowport"]["ipam"]["config"]
    assert server.trusted_proxies == [address]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(subnet["subnet"])

    environment = image_environment | envoy.get("environment", {})
    assert _envoy_validates(envoy["command"], environment, tmp_path) == edge.upstream_dns


def _kubernetes() -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """The namespace of k8s/kustomization.yaml, the objects it applies, and the example Secret."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    documents = [d for name in kustomization["resources"] for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return kustomization["namespace"], documents, yaml.safe_load((K8S / "secret.example.yaml").read_text())


@pytest.mark.timeout(60)
def test_the_kubernetes_manifests_pass_the_kubernetes_schemas() -> None:
    _, documents, secret = _kubernetes()
    problems = []
    for document in [*documents, secret]:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                name = f"{document['kind']} {document['metadata']['name']}"
                problems.append(f"{name} (Kubernetes {version}): {exc.message}")
    assert not problems


@pytest.mark.timeout(120)
def test_the_kubernetes_manifests_run_envoy_in_front_of_a_headless_service(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    namespace, documents, secret = _kubernetes()
    objects = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    assert ("Namespace", namespace) in objects
    assert secret["metadata"]["namespace"] == namespace

    def pods(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A Deployment's pod spec and its one container; the Deployment selects its own pods."""
        spec = objects[("Deployment", name)]["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
        [container] = spec["template"]["spec"]["containers"]
        assert container["image"] == IMAGE
        return spec["template"], container

    def environment(container: dict[str, Any], secret_values: dict[str, str]) -> dict[str, str]:
        values = {}
        for variable in container.get("env", []):
            if "valueFrom" in variable:
                reference = variable["valueFrom"]["secretKeyRef"]
                assert reference["name"] == secret["metadata"]["name"]
                values[variable["name"]] = secret_values[reference["key"]]
            else:
                values[variable["name"]] = variable["value"]
        return image_environment | values

    _, image_environment, _ = _image()
    template, container = pods("flowport-server")
    # The Secret as shipped (empty values) keeps a server from starting; filled in, it starts.
    with pytest.raises(SettingsError):
        _settings(monkeypatch, container["args"], environment(container, secret["stringData"]))
    filled = {
        "database-url": "postgresql://flowport:secret@postgres.example.internal:5432/flowport",
        "redis-url": "redis://redis.example.internal:6379/0",
        "secrets-key": DOTENV["FLOWPORT_SECRETS_KEY"],
        "admin-api-key": DOTENV["FLOWPORT_ADMIN_API_KEY"],
    }
    assert set(filled) == set(secret["stringData"])
    server = _settings(monkeypatch, container["args"], environment(container, filled))
    assert server.grpc_host == EVERY_ADDRESS
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": server.grpc_port, "websocket": server.websocket_port, "metrics": server.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": server.grpc_port}, probe
    assert template["spec"]["terminationGracePeriodSeconds"] > _stop_time(server)

    headless = objects[("Service", "flowport-server-headless")]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["selector"].items() <= template["metadata"]["labels"].items()
    assert {port["targetPort"] for port in headless["ports"]} <= set(ports)

    template, container = pods("flowport-envoy")
    edge = _settings(monkeypatch, container["args"], environment(container, {}))
    assert edge.no_local_server
    assert edge.host == EVERY_ADDRESS
    assert edge.upstream_dns == [f"flowport-server-headless.{namespace}.svc.cluster.local:{server.grpc_port}"]
    assert edge.websocket_port == server.websocket_port
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {"http": edge.http_port}
    assert container["readinessProbe"]["httpGet"] == {"path": HEALTH_CHECK_PATH, "port": "http"}
    front = objects[("Service", "flowport-envoy")]["spec"]
    assert front["selector"].items() <= template["metadata"]["labels"].items()
    assert [port["targetPort"] for port in front["ports"]] == ["http"]

    assert _envoy_validates(container["args"], environment(container, {}), tmp_path) == edge.upstream_dns


def test_in_kubernetes_only_envoy_reaches_the_servers_call_ports() -> None:
    _, documents, _ = _kubernetes()
    objects = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    server = objects[("Deployment", "flowport-server")]["spec"]["template"]
    envoy_labels = objects[("Deployment", "flowport-envoy")]["spec"]["template"]["metadata"]["labels"]
    [container] = server["spec"]["containers"]
    policy = objects[("NetworkPolicy", "flowport-server")]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= server["metadata"]["labels"].items()
    assert policy["policyTypes"] == ["Ingress"]
    admitted = {port["port"]: rule["from"] for rule in policy["ingress"] for port in rule["ports"]}
    # Every port the server listens on has its rule (one left out would be closed to everyone)...
    assert set(admitted) == {port["name"] for port in container["ports"]}
    # ...the gRPC and /ws ports to Envoy's pods of this namespace only; metrics to any scraper.
    for name in ("grpc", "websocket"):
        [peer] = admitted[name]
        assert set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"].items() <= envoy_labels.items()
    assert admitted["metrics"] == [{"namespaceSelector": {}}]


@pytest.mark.timeout(120)
def test_the_compose_health_checks_pass_on_a_running_stack_and_fail_without_one(stack: Stack) -> None:
    compose, _ = _compose()
    base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for service, variable, port in (
        ("server-a", "FLOWPORT_GRPC_PORT", stack.settings.grpc_port),
        ("envoy", "FLOWPORT_HTTP_PORT", stack.settings.http_port),
    ):
        kind, program, *args = compose["services"][service]["healthcheck"]["test"]
        assert (kind, program) == ("CMD", "python")
        for target, healthy in ((port, True), (free_port(), False)):
            result = subprocess.run(
                [sys.executable, *args],
                env=base | {variable: str(target)},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert (result.returncode == 0) is healthy, (service, target, result.stderr[-2000:])
