"""`flowport sessions|workflows|executions|events|webhooks ...`: the API from a shell.

Each command is one or a few SDK calls (flowport.clients.Client) against a
running server (`--target`, default the server's gRPC address from the
settings; Envoy's address works too). Results go to stdout as a table or,
with `--output json`, as proto3 JSON with the API's field names; progress
and errors go to stderr, errors as one line: `flowport: CODE: message
[REASON] (field: problem)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowport.clients.cli.keys import (
    API_KEY_ENV,
    EXIT_API_ERROR,
    EXIT_USAGE,
    CliError,
    explain,
    run_client_command,
)
from flowport.clients.cli.output import FORMATS, render

if TYPE_CHECKING:
    from flowport.clients import Client

# Beyond keys_cli's codes: an execution that ended FAILED or CANCELLED.
EXIT_EXECUTION_FAILED = 5
EPILOG = f"""\
The API key is taken from --api-key, else ${API_KEY_ENV}, else the admin_api_key
setting, else <data-dir>/admin-api-key.

exit codes: 0 done; 1 the server refused the request (the message says why);
2 bad usage, a bad file or no key; 3 server unreachable; 4 key not accepted;
5 the execution ended FAILED or CANCELLED (run --wait, watch); 141 the output
went into a pipe its reader closed (`| head`)."""

Out = Callable[[str], None]
Handler = Callable[["Client", argparse.Namespace, Out], int]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", metavar="HOST:PORT", help="server or Envoy address (default: the settings')")
    parser.add_argument("--api-key", metavar="KEY", help=f"API key (default: ${API_KEY_ENV}, see below)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="the server's data dir (env FLOWPORT_DATA_DIR)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file with settings (env FLOWPORT_CONFIG)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per call (default 30)")
    parser.add_argument("-o", "--output", choices=FORMATS, default="table", help="table (default) or json")


def _command(actions: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(
        name, help=help_text, description=help_text, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _common(parser)
    parser.set_defaults(handler=handler)
    return parser


def _group(commands: Any, name: str, help_text: str) -> Any:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def add_resource_parsers(commands: Any) -> None:
    """Add sessions, workflows, executions, events and webhooks to the top-level subparsers."""
    for add in (_add_sessions, _add_workflows, _add_executions, _add_events, _add_webhooks):
        add(commands)


def _add_sessions(commands: Any) -> None:
    sessions = _group(commands, "sessions", "create, list, show and delete sessions")
    create = _command(sessions, "create", "start a session", _session_create)
    create.add_argument("--user-id", default="", help="the session's user")
    create.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime (default: the server's)")
    listing = _command(sessions, "list", "live sessions, newest first", _session_list)
    listing.add_argument("--user-id", default="", help="only this user's")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _command(sessions, "get", "one session", _session_get).add_argument("session_id")
    _command(sessions, "delete", "end a session", _session_delete).add_argument("session_id")


def _add_workflows(commands: Any) -> None:
    workflows = _group(commands, "workflows", "create, validate, list, show and delete workflows")
    create = _command(workflows, "create", "create a workflow (or a new version) from a JSON file", _workflow_create)
    create.add_argument("-f", "--file", type=Path, required=True, help="the workflow as JSON ('-' reads stdin)")
    check = _command(workflows, "validate", "check a workflow file without creating it", _workflow_validate)
    check.add_argument("-f", "--file", type=Path, required=True, help="the workflow as JSON ('-' reads stdin)")
    listing = _command(workflows, "list", "workflows, newest first", _workflow_list)
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    get = _command(workflows, "get", "one workflow", _workflow_get)
    get.add_argument("workflow_id")
    get.add_argument("--version", type=int, default=0, help="a version (default: the latest)")
    _command(workflows, "delete", "delete a workflow", _workflow_delete).add_argument("workflow_id")


def _add_executions(commands: Any) -> None:
    executions = _group(commands, "executions", "run, list, show, watch and cancel executions")
    run = _command(executions, "run", "run a workflow (from a file, or an existing one by id)", _execution_run)
    which = run.add_mutually_exclusive_group(required=True)
    which.add_argument("-f", "--file", type=Path, help="a workflow JSON file: created, then run")
    which.add_argument("--workflow", metavar="ID", help="an existing workflow's id")
    run.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input; VALUE is read as JSON when it parses (7, true, [1,2]), else as text; repeatable",
    )
    run.add_argument("--wait", action="store_true", help="wait until it ends, showing progress on stderr")
    listing = _command(executions, "list", "executions, newest first", _execution_list)
    listing.add_argument("--workflow", default="", metavar="ID", help="only this workflow's")
    listing.add_argument(
        "--state", choices=["pending", "running", "succeeded", "failed", "cancelled"], help="only in this state"
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _command(executions, "get", "one execution", _execution_get).add_argument("execution_id")
    _command(executions, "cancel", "cancel an execution", _execution_cancel).add_argument("execution_id")
    _command(executions, "watch", "follow an execution until it ends", _execution_watch).add_argument("execution_id")


def _add_events(commands: Any) -> None:
    events = _group(commands, "events", "follow the event stream")
    tail = _command(events, "tail", "print events as they happen (resumes after a dropped connection)", _events_tail)
    tail.add_argument("--type", dest="types", action="append", default=[], help="a type or family (execution.*)")
    tail.add_argument("--after", default="", metavar="EVENT_ID", help="start after this event id (replays)")
    tail.add_argument("--count", type=int, help="stop after this many events")


def _add_webhooks(commands: Any) -> None:
    webhooks = _group(commands, "webhooks", "register, list and remove webhooks")
    create = _command(webhooks, "create", "register a webhook", _webhook_create)
    create.add_argument("--url", required=True, help="where deliveries are POSTed")
    create.add_argument("--event-type", dest="event_types", action="append", default=[], help="repeatable")
    create.add_argument("--secret", default="", help="signs each delivery (X-Flowport-Signature)")
    listing = _command(webhooks, "list", "webhooks", _webhook_list)
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    _command(webhooks, "get", "one webhook", _webhook_get).add_argument("webhook_id")
    _command(webhooks, "delete", "remove a webhook", _webhook_delete).add_argument("webhook_id")
    deliveries = _command(webhooks, "deliveries", "a webhook's deliveries", _webhook_deliveries)
    deliveries.add_argument("webhook_id")
    deliveries.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")


def run_resource(args: argparse.Namespace, out: Out = print) -> int:
    """Run one resource command; returns the exit code."""
    from flowport.clients import ApiError, Client

    def call(target: str, api_key: str) -> int:
        with Client(target, api_key=api_key, timeout=args.timeout) as client:
            try:
                code: int = args.handler(client, args, out)
            except ApiError as error:
                raise explain(error, target, admin_needed=False) from None
        return code

    try:
        return run_client_command(args, call)
    except KeyboardInterrupt:
        return 130


def _show(out: Out, args: argparse.Namespace, messages: list[Any], *, single: bool = False) -> None:
    text = render(messages, args.output, single=single)
    if text:
        out(text)


def _flush() -> None:
    """Each line of a stream as it comes, also into a pipe (`| head`, `| grep`), not when a buffer fills."""
    sys.stdout.flush()


def _limited(items: Iterator[Any], limit: int) -> list[Any]:
    taken: list[Any] = []
    for item in items:
        if len(taken) >= limit:
            break
        taken.append(item)
    return taken


# -- sessions -------------------------------------------------------------


def _session_create(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import session_pb2

    session = session_pb2.Session(user_id=args.user_id)
    if args.ttl is not None:
        session.ttl.FromSeconds(args.ttl)
    _show(out, args, [client.sessions.CreateSession(session_pb2.CreateSessionRequest(session=session))], single=True)
    return 0


def _session_list(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import session_pb2

    request = session_pb2.ListSessionsRequest(user_id=args.user_id, page_size=min(args.limit, 100))
    _show(out, args, _limited(client.paginate(client.sessions.ListSessions, request), args.limit))
    return 0


def _session_get(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import session_pb2

    session = client.sessions.GetSession(session_pb2.GetSessionRequest(session_id=args.session_id))
    _show(out, args, [session], single=True)
    return 0


def _session_delete(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import session_pb2

    client.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=args.session_id))
    print(f"deleted session {args.session_id}", file=sys.stderr)
    return 0


# -- workflows ------------------------------------------------------------


def read_message(path: Path, message: Any, what: str) -> Any:
    """`message` filled from the JSON file at `path` ('-': stdin); exit 2 naming the file when it cannot be."""
    from google.protobuf import json_format

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    try:
        return json_format.Parse(text, message)
    except json_format.ParseError as exc:
        raise CliError(f"{path} is not {what} in JSON: {exc}", EXIT_USAGE) from None


def _read_workflow(path: Path) -> Any:
    from flowport.v1 import workflow_pb2

    return read_message(path, workflow_pb2.Workflow(), "a workflow")


def _workflow_create(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import workflow_pb2

    created = client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=_read_workflow(args.file)))
    _show(out, args, [created], single=True)
    return 0


def _workflow_validate(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import workflow_pb2

    verdict = client.workflows.ValidateWorkflow(
        workflow_pb2.ValidateWorkflowRequest(workflow=_read_workflow(args.file))
    )
    if args.output == "json":
        from flowport.clients.cli.output import as_dict

        out(json.dumps(as_dict(verdict), indent=2))
    elif verdict.valid:
        out(f"{args.file}: valid")
    else:
        out("\n".join(f"{args.file}: {e.field}: {e.description}" for e in verdict.errors))
    return 0 if verdict.valid else EXIT_API_ERROR


def _workflow_list(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import workflow_pb2

    request = workflow_pb2.ListWorkflowsRequest(page_size=min(args.limit, 100))
    _show(out, args, _limited(client.paginate(client.workflows.ListWorkflows, request), args.limit))
    return 0


def _workflow_get(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import workflow_pb2

    request = workflow_pb2.GetWorkflowRequest(workflow_id=args.workflow_id, version=args.version)
    _show(out, args, [client.workflows.GetWorkflow(request)], single=True)
    return 0


def _workflow_delete(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import workflow_pb2

    client.workflows.DeleteWorkflow(workflow_pb2.DeleteWorkflowRequest(workflow_id=args.workflow_id))
    print(f"deleted workflow {args.workflow_id}", file=sys.stderr)
    return 0


# -- executions -----------------------------------------------------------


def parse_inputs(pairs: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` pairs; VALUE as JSON when it parses, else as text."""
    inputs: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"--input {pair!r} is not NAME=VALUE", EXIT_USAGE)
        try:
            inputs[name] = json.loads(value)
        except ValueError:
            inputs[name] = value
    return inputs


def _ended_code(execution: Any) -> int:
    from flowport.v1 import execution_pb2

    failed = (execution_pb2.Execution.STATE_FAILED, execution_pb2.Execution.STATE_CANCELLED)
    return EXIT_EXECUTION_FAILED if execution.state in failed else 0


def _progress(update: Any) -> None:
    """One stderr line per state seen and per node event while waiting; a failed node says why."""
    from flowport.v1 import execution_pb2

    if update.HasField("execution"):
        print(f"  {execution_pb2.Execution.State.Name(update.execution.state)}", file=sys.stderr, flush=True)
    elif update.event.type.startswith(("node.", "execution.")):
        fields = update.event.data.fields
        node = f" {fields['node_id'].string_value}" if "node_id" in fields else ""
        why = ""
        if "error" in fields:
            reason = fields["reason"].string_value if "reason" in fields else ""
            why = f": {fields['error'].string_value}" + (f" [{reason}]" if reason else "")
        print(f"  {update.event.type}{node}{why}", file=sys.stderr, flush=True)


def _ended(execution: Any) -> None:
    """The last stderr line of a wait: the state, and for a failed or cancelled execution why."""
    from flowport.clients.cli.output import describe_status
    from flowport.v1 import execution_pb2

    line = f"{execution.execution_id}: {execution_pb2.Execution.State.Name(execution.state)}"
    if execution.HasField("error"):
        line += f": {describe_status(execution.error)}"
    print(line, file=sys.stderr, flush=True)


def _show_execution(out: Out, args: argparse.Namespace, execution: Any) -> None:
    """The execution; in a table, followed by its outputs per node, cut to the terminal's width."""
    import shutil

    from flowport.clients.cli.output import execution_outputs

    _show(out, args, [execution], single=True)
    if args.output != "table":
        return
    lines, cut = execution_outputs(execution, shutil.get_terminal_size().columns)
    if lines:
        out("\n" + "\n".join(lines))
    if cut:
        out(f"(cut to fit; `flowport executions get {execution.execution_id} -o json` prints every output in full)")


def _execution_run(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import execution_pb2, workflow_pb2

    inputs = parse_inputs(args.input)
    workflow_id, version = args.workflow, 0
    if args.file is not None:
        created = client.workflows.CreateWorkflow(
            workflow_pb2.CreateWorkflowRequest(workflow=_read_workflow(args.file))
        )
        workflow_id, version = created.workflow_id, created.version
    request = execution_pb2.CreateExecutionRequest(workflow_id=workflow_id, workflow_version=version)
    request.inputs.update(inputs)
    execution = client.executions.CreateExecution(request)
    if args.wait:
        print(f"{execution.execution_id}: waiting…", file=sys.stderr, flush=True)
        for update in client.watch(execution.execution_id):
            _progress(update)
        execution = client.executions.GetExecution(
            execution_pb2.GetExecutionRequest(execution_id=execution.execution_id)
        )
        _ended(execution)
    _show_execution(out, args, execution)
    return _ended_code(execution) if args.wait else 0


def _execution_list(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import execution_pb2

    request = execution_pb2.ListExecutionsRequest(workflow_id=args.workflow, page_size=min(args.limit, 100))
    if args.state:
        request.state = execution_pb2.Execution.State.Value(f"STATE_{args.state.upper()}")
    _show(out, args, _limited(client.paginate(client.executions.ListExecutions, request), args.limit))
    return 0


def _execution_get(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import execution_pb2

    execution = client.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=args.execution_id))
    _show_execution(out, args, execution)
    return 0


def _execution_cancel(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import execution_pb2

    execution = client.executions.CancelExecution(execution_pb2.CancelExecutionRequest(execution_id=args.execution_id))
    _show(out, args, [execution], single=True)
    return 0


def _execution_watch(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.clients.cli.output import as_dict
    from flowport.v1 import execution_pb2

    for update in client.watch(args.execution_id):
        if not update.HasField("event"):
            continue
        if args.output == "json":
            out(json.dumps(as_dict(update.event)))  # one object per line, as `events tail`
        else:
            _show(out, args, [update.event])
        _flush()
    execution = client.executions.GetExecution(execution_pb2.GetExecutionRequest(execution_id=args.execution_id))
    _ended(execution)
    return _ended_code(execution)


# -- events ---------------------------------------------------------------


def _events_tail(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.clients.cli.output import COLUMNS, as_dict
    from flowport.v1 import event_pb2

    request = event_pb2.StreamEventsRequest(types=args.types, after_id=args.after)
    columns = COLUMNS["flowport.v1.Event"]
    for shown, event in enumerate(client.events(request), start=1):
        if args.output == "json":
            out(json.dumps(as_dict(event)))  # one object per line, for jq and scripts
        else:
            row = as_dict(event)
            out("  ".join(str(get(row)) for _, get in columns))
        _flush()
        if args.count is not None and shown >= args.count:
            break
    return 0


# -- secrets --------------------------------------------------------------


def add_secret_actions(actions: Any) -> None:
    """`secrets put|list|delete`, beside the key management actions of secrets_cli."""
    put = _command(actions, "put", "store (or replace) a secret; its value is never shown again", _secret_put)
    put.add_argument("name")
    put.add_argument(
        "--value-file",
        type=Path,
        metavar="FILE",
        help="read the value from FILE (default: stdin; never an argument, which shell history would keep)",
    )
    put.add_argument("--description", default="", help="what the secret is for")
    listing = _command(actions, "list", "the tenant's secrets (names and versions, never values)", _secret_list)
    listing.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    _command(actions, "delete", "delete a secret", _secret_delete).add_argument("name")


def _secret_put(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import secret_pb2

    try:
        value = args.value_file.read_text(encoding="utf-8") if args.value_file else sys.stdin.read()
    except OSError as exc:
        raise CliError(f"cannot read {args.value_file}: {exc.strerror}", EXIT_USAGE) from None
    value = value.removesuffix("\n")
    request = secret_pb2.PutSecretRequest(name=args.name, value=value, description=args.description)
    _show(out, args, [client.secrets.PutSecret(request)], single=True)
    return 0


def _secret_list(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import secret_pb2

    request = secret_pb2.ListSecretsRequest(page_size=min(args.limit, 100))
    _show(out, args, _limited(client.paginate(client.secrets.ListSecrets, request), args.limit))
    return 0


def _secret_delete(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import secret_pb2

    client.secrets.DeleteSecret(secret_pb2.DeleteSecretRequest(name=args.name))
    print(f"deleted secret {args.name}", file=sys.stderr)
    return 0


# -- webhooks -------------------------------------------------------------


def _webhook_create(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import webhook_pb2

    webhook = webhook_pb2.Webhook(url=args.url, event_types=args.event_types, secret=args.secret)
    _show(out, args, [client.webhooks.CreateWebhook(webhook_pb2.CreateWebhookRequest(webhook=webhook))], single=True)
    return 0


def _webhook_list(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import webhook_pb2

    request = webhook_pb2.ListWebhooksRequest(page_size=min(args.limit, 100))
    _show(out, args, _limited(client.paginate(client.webhooks.ListWebhooks, request), args.limit))
    return 0


def _webhook_get(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import webhook_pb2

    webhook = client.webhooks.GetWebhook(webhook_pb2.GetWebhookRequest(webhook_id=args.webhook_id))
    _show(out, args, [webhook], single=True)
    return 0


def _webhook_delete(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import webhook_pb2

    client.webhooks.DeleteWebhook(webhook_pb2.DeleteWebhookRequest(webhook_id=args.webhook_id))
    print(f"deleted webhook {args.webhook_id}", file=sys.stderr)
    return 0


def _webhook_deliveries(client: Client, args: argparse.Namespace, out: Out) -> int:
    from flowport.v1 import webhook_pb2

    request = webhook_pb2.ListWebhookDeliveriesRequest(webhook_id=args.webhook_id, page_size=min(args.limit, 100))
    _show(out, args, _limited(client.paginate(client.webhooks.ListWebhookDeliveries, request), args.limit))
    return 0
