"""The `flowport` command.

    flowport up             run the gRPC server and Envoy (REST on :8080)
    flowport serve          run the gRPC server alone, behind your own Envoy
    flowport envoy-config   print the Envoy bootstrap `up` would use
    flowport keys create|list|revoke
                            manage API keys on a running server (admin key)
    flowport secrets rotate-key|generate-key
                            re-encrypt secrets under a new key (no downtime)
    flowport upstreams list|set|add|remove
                            change the servers a running `up`'s Envoy
                            sends calls to, without restarting it
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
import logging
import os
import sys
from collections.abc import Sequence

from flowport.clients.cli import server
from flowport.clients.cli.api_command import run_api_command
from flowport.clients.cli.commands import add_resources, add_services, add_sessions, add_webhooks, add_workflows
from flowport.clients.cli.connect import EXIT_BROKEN_PIPE, EXIT_USAGE
from flowport.clients.cli.executions import add_events, add_executions
from flowport.clients.cli.keys import add_keys_parser, run_keys
from flowport.clients.cli.secrets import add_secrets_parser, run_secrets
from flowport.clients.cli.settings_flags import add_setting_flags, load_settings
from flowport.clients.cli.upstreams import add_upstreams_parser, run_upstreams
from flowport.server.settings import SettingsError
from flowport.server.version import VERSION

__all__ = ["build_parser", "load_settings", "main"]


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
        add_setting_flags(sub)
    add_keys_parser(commands)
    add_secrets_parser(commands)
    add_upstreams_parser(commands)
    # In this order in `flowport --help`.
    for add in (add_sessions, add_workflows, add_executions, add_events, add_webhooks, add_services, add_resources):
        add(commands)
    completion = commands.add_parser(
        "completion",
        help="print a completion script: `flowport completion bash > /etc/bash_completion.d/flowport`",
        description="Print a shell completion script for flowport (generated from its arguments).",
    )
    completion.add_argument("shell", choices=["bash", "zsh", "tcsh"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flowport` command.

    A reader that stops early (`flowport keys list | head -1`) ends the
    command quietly with exit code 141, as SIGPIPE ends other Unix tools:
    every command's output meets a closed pipe here, and only here.
    """
    try:
        try:
            return _run(argv)
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


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completion":
        import shtab

        print(shtab.complete(parser, shell=args.shell))
        return 0
    if getattr(args, "handler", None) is not None:
        return run_api_command(args)
    if args.command == "keys":
        # A client of a running server: only the settings that locate it apply.
        return run_keys(args)
    if args.command == "upstreams":
        # Files in a running `up`'s data dir, and its Envoy's admin: only the data dir is a setting here.
        return run_upstreams(args)
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return EXIT_USAGE
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
        return server.envoy_config(settings)
    if args.command == "serve":
        return server.serve(settings)
    return server.up(settings)
