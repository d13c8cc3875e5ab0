"""`flowport executions|events ...`: run workflows, follow them, and tail the event stream.

`executions run --wait` and `watch` print progress on stderr and end with
the execution's state (and, when it failed, its code, reason and message);
their exit code is 5 when it ended FAILED or CANCELLED. In a table, an
execution is followed by each node's outputs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowport.clients.cli.api_command import Call, Out, add_command, add_group, add_limit, flush, show
from flowport.clients.cli.commands import read_workflow
from flowport.clients.cli.connect import EXIT_EXECUTION_FAILED, EXIT_USAGE, CliError
from flowport.clients.cli.output import COLUMNS, as_dict, describe_status, execution_outputs
from flowport.v1 import event_pb2, execution_pb2, workflow_pb2

if TYPE_CHECKING:
    from flowport.clients import Client

_ENDED_BADLY = (execution_pb2.Execution.STATE_FAILED, execution_pb2.Execution.STATE_CANCELLED)


def add_executions(commands: Any) -> None:
    """Add `executions` and its actions to the top-level subparsers."""
    executions = add_group(commands, "executions", "run, list, show, watch and cancel executions")
    run = add_command(executions, "run", "run a workflow (from a file, or an existing one by id)", _run)
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
    listing = add_command(
        executions,
        "list",
        "executions, newest first",
        Call("executions", "ListExecutions", _list_request, shows="list"),
    )
    listing.add_argument("--workflow", default="", metavar="ID", help="only this workflow's")
    listing.add_argument(
        "--state", choices=["pending", "running", "succeeded", "failed", "cancelled"], help="only in this state"
    )
    add_limit(listing)
    add_command(executions, "get", "one execution", _get).add_argument("execution_id")
    cancel = Call(
        "executions", "CancelExecution", lambda a: execution_pb2.CancelExecutionRequest(execution_id=a.execution_id)
    )
    add_command(executions, "cancel", "cancel an execution", cancel).add_argument("execution_id")
    add_command(executions, "watch", "follow an execution until it ends", _watch).add_argument("execution_id")


def add_events(commands: Any) -> None:
    """Add `events tail` to the top-level subparsers."""
    events = add_group(commands, "events", "follow the event stream")
    tail = add_command(events, "tail", "print events as they happen (resumes after a dropped connection)", _tail)
    tail.add_argument("--type", dest="types", action="append", default=[], help="a type or family (execution.*)")
    tail.add_argument("--after", default="", metavar="EVENT_ID", help="start after this event id (replays)")
    tail.add_argument("--count", type=int, help="stop after this many events")


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


def _list_request(args: argparse.Namespace) -> execution_pb2.ListExecutionsRequest:
    request = execution_pb2.ListExecutionsRequest(workflow_id=args.workflow)
    if args.state:
        request.state = execution_pb2.Execution.State.Value(f"STATE_{args.state.upper()}")
    return request


def _ended_code(execution: execution_pb2.Execution) -> int:
    return EXIT_EXECUTION_FAILED if execution.state in _ENDED_BADLY else 0


def _progress(update: execution_pb2.WatchExecutionResponse) -> None:
    """One stderr line per state seen and per node event while waiting; a failed node says why."""
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


def _ended(execution: execution_pb2.Execution) -> None:
    """The last stderr line of a wait: the state, and for a failed or cancelled execution why."""
    line = f"{execution.execution_id}: {execution_pb2.Execution.State.Name(execution.state)}"
    if execution.HasField("error"):
        line += f": {describe_status(execution.error)}"
    print(line, file=sys.stderr, flush=True)


def _show_execution(out: Out, args: argparse.Namespace, execution: execution_pb2.Execution) -> None:
    """The execution; in a table, followed by its outputs per node, cut to the terminal's width."""
    show(out, args, [execution], single=True)
    if args.output != "table":
        return
    lines, cut = execution_outputs(execution, shutil.get_terminal_size().columns)
    if lines:
        out("\n" + "\n".join(lines))
    if cut:
        out(f"(cut to fit; `flowport executions get {execution.execution_id} -o json` prints every output in full)")


def _fetch(client: Client, execution_id: str) -> execution_pb2.Execution:
    execution: execution_pb2.Execution = client.executions.GetExecution(
        execution_pb2.GetExecutionRequest(execution_id=execution_id)
    )
    return execution


def _run(client: Client, args: argparse.Namespace, out: Out) -> int:
    inputs = parse_inputs(args.input)
    workflow_id, version = args.workflow, 0
    if args.file is not None:
        created = client.workflows.CreateWorkflow(workflow_pb2.CreateWorkflowRequest(workflow=read_workflow(args.file)))
        workflow_id, version = created.workflow_id, created.version
    request = execution_pb2.CreateExecutionRequest(workflow_id=workflow_id, workflow_version=version)
    request.inputs.update(inputs)
    execution = client.executions.CreateExecution(request)
    if args.wait:
        print(f"{execution.execution_id}: waiting…", file=sys.stderr, flush=True)
        for update in client.watch(execution.execution_id):
            _progress(update)
        execution = _fetch(client, execution.execution_id)
        _ended(execution)
    _show_execution(out, args, execution)
    return _ended_code(execution) if args.wait else 0


def _get(client: Client, args: argparse.Namespace, out: Out) -> int:
    _show_execution(out, args, _fetch(client, args.execution_id))
    return 0


def _watch(client: Client, args: argparse.Namespace, out: Out) -> int:
    for update in client.watch(args.execution_id):
        if not update.HasField("event"):
            continue
        if args.output == "json":
            out(json.dumps(as_dict(update.event)))  # one object per line, as `events tail`
        else:
            show(out, args, [update.event])
        flush()
    execution = _fetch(client, args.execution_id)
    _ended(execution)
    return _ended_code(execution)


def _tail(client: Client, args: argparse.Namespace, out: Out) -> int:
    request = event_pb2.StreamEventsRequest(types=args.types, after_id=args.after)
    columns = COLUMNS["flowport.v1.Event"]
    for shown, event in enumerate(client.events(request), start=1):
        if args.output == "json":
            out(json.dumps(as_dict(event)))  # one object per line, for jq and scripts
        else:
            row = as_dict(event)
            out("  ".join(str(get(row)) for _, get in columns))
        flush()
        if args.count is not None and shown >= args.count:
            break
    return 0
