"""The `flowport` command.

    flowport up             run the gRPC server and Envoy (REST on :8080)
    flowport serve          run the gRPC server alone, behind your own Envoy
    flowport envoy-config   print the Envoy bootstrap `up` would use
    flowport keys create|list|revoke
                            manage API keys on a running server (admin key)
    flowport secrets rotate-key|generate-key
                            re-encrypt secrets under a new key (no downtime)
    flowport sessions|workflows|executions|events|webhooks ...
                            the API from a shell (`flowport executions run
                            -f workflow.json --input n=7 --wait`)
    flowport completion bash|zsh
                            print a shell completion script

Every setting is a flag here, a FLOWPORT_<NAME> environment variable, or a
key in the TOML file given with --config (flags win over the environment,
which wins over the file). Output piped into a reader that stops early
(`| head`) ends the command quietly with exit code 141 (128 + SIGPIPE).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowport.clients.cli.commands import add_resource_parsers, run_resource
from flowport.clients.cli.integration_commands import add_integration_parsers
from flowport.clients.cli.keys import add_keys_parser, run_keys
from flowport.clients.cli.secrets import add_secrets_parser, run_secrets
from flowport.server.settings import ENV_PREFIX, Settings, SettingsError
from flowport.server.version import VERSION

# 128 + SIGPIPE: what a shell reports for a tool that a closed pipe ended.
EXIT_BROKEN_PIPE = 141


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (flag > FLOWPORT_* environment > --config file > default)")
    group.add_argument("--config", type=Path, metavar="FILE", help="TOML file with settings (env FLOWPORT_CONFIG)")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "none" if default in (None, []) else default
        # A switch may stand alone (`--dev`) or take a value (`--dev false`, as in the environment).
        switch: dict[str, Any] = {"nargs": "?", "const": "true"} if field.annotation is bool else {}
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar="BOOL" if switch else name.split("_")[-1].upper(),
            default=None,
            help=f"{field.description} (default {shown}; env {ENV_PREFIX}{name.upper()})",
            **switch,
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one subcommand per action."""
    parser = argparse.ArgumentParser(
        prog="flowport", description="flowport: a gRPC-first workflow gateway with REST through Envoy."
    )
    parser.add_argument("--version", action="version", version=f"flowport {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in (
        ("up", "run the gRPC server and Envoy in front of it until Ctrl-C"),
        ("serve", "run the gRPC server alone (for an Envoy you run yourself)"),
        ("envoy-config", "print the Envoy bootstrap (JSON) that `up` renders from the settings"),
    ):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _add_setting_flags(sub)
    add_keys_parser(commands)
    add_secrets_parser(commands, _add_setting_flags)
    add_resource_parsers(commands)
    add_integration_parsers(commands)
    completion = commands.add_parser(
        "completion",
        help="print a completion script: `flowport completion bash > /etc/bash_completion.d/flowport`",
        description="Print a shell completion script for flowport (generated from its arguments).",
    )
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    return parser


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from the parsed flags, the environment and the config file."""
    flags: dict[str, Any] = {name: getattr(args, name) for name in Settings.model_fields}
    return Settings.load(flags, config_file=args.config)


def _serve(settings: Settings) -> int:
    """`flowport serve`, holding the data dir (server/datadir.py) for as long as it runs."""
    from flowport.server.datadir import DataDirError, open_data_dir

    try:
        data_dir = open_data_dir(settings.data_dir, "flowport serve")
    except DataDirError as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return 2
    for warning in data_dir.warnings:
        logging.getLogger("flowport.server").warning("%s", warning)
    # Imported once the data dir is this process's: a refusal prints its one line and nothing else.
    from flowport.server.app import run

    try:
        return run(settings)
    finally:
        data_dir.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowport` command.

    A reader that stops early (`flowport keys list | head -1`) ends the
    command quietly with exit code 141, as SIGPIPE ends other Unix tools.
    """
    try:
        try:
            return _main(argv)
        finally:
            # Written here, not at interpreter exit, so a closed pipe is caught below.
            sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_BROKEN_PIPE


def _discard_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered must not fail again at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (a test's capture): nothing is flushed to a pipe at exit
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        import shtab

        print(shtab.complete(parser, shell=args.shell))
        return 0
    if getattr(args, "handler", None) is not None:
        return run_resource(args)
    if args.command == "keys":
        # A client of a running server: only the settings that locate it apply.
        return run_keys(args)
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return 2
    if args.command in ("serve", "up"):
        from flowport.server.observability.logs import configure

        configure(settings.log_level, settings.log_format)
    else:
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    if args.command == "secrets":
        return run_secrets(args, settings)
    if args.command == "envoy-config":
        from flowport.transcoder.envoy_config import render

        print(json.dumps(render(settings), indent=2))
        return 0
    if args.command == "serve":
        return _serve(settings)
    from flowport.server.supervisor import up

    return up(settings, out=lambda line: print(line, flush=True))
