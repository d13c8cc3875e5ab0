"""PythonCodeNode: user code, run in the sandbox pool, never in the server.

The code sees each parameter as a variable (config keys other than `code`,
execution inputs, connected values) plus `datetime`, `date`, `timedelta`,
`json`, `math` and `re`; whatever it assigns to `result` is the node's
output `result`. Syntax errors are found when the workflow is validated.

`tenant_id`, `session_id`, `execution_id` and `workflow_id` are the
execution's own, as `${tenant_id}` and the like are in configs: bound from
the run, never from a parameter, so an input, a connection or a config key
of one of these names is ignored (as configs' `${tenant_id}` ignores them)
and a caller cannot pose as another tenant. They are never required inputs.
"""

from __future__ import annotations

import builtins
import symtable
from collections.abc import Mapping
from typing import Any, ClassVar

from flowport.server.errors import SHOWN_CHARS, cut
from flowport.server.nodes.base import JsonSchema, NodeContext, NodeError, NodeType, Violation
from flowport.server.nodes.substitution import EXECUTION_VARIABLE_NAMES
from flowport.server.sandbox import errors as sandbox_errors

BUILTIN_NAMES = frozenset(dir(builtins))

MAX_CODE_CHARS = 100_000
# Names the sandbox provides to every run (see sandbox/worker.py).
PROVIDED = frozenset({"datetime", "date", "timedelta", "json", "math", "re", "__name__"})


def free_variables(code: str) -> set[str]:
    """Global names `code` reads and never assigns: the inputs it expects.

    Empty when the code does not parse (validation reports that).
    """
    try:
        top = symtable.symtable(code, "<node>", "exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return set()
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    used: set[str] = set()
    tables = [top]
    while tables:
        table = tables.pop()
        for symbol in table.get_symbols():
            global_read = symbol.is_global() or table is top
            if symbol.is_referenced() and global_read and not (table is top and symbol.get_name() in bound):
                used.add(symbol.get_name())
        tables.extend(table.get_children())
    # A module's dunder names (`__builtins__`, `__file__`...) are the interpreter's, never an input
    # a caller could give: a run gets them from the sandbox, or a NameError.
    return {name for name in used - bound - BUILTIN_NAMES - PROVIDED if not _dunder(name)}


def _dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


class PythonCodeNode(NodeType):
    """Runs a Python snippet in a sandboxed worker process."""

    type_name = "PythonCodeNode"
    description = (
        "Runs Python code in a sandboxed worker process. Parameters are variables; "
        "the value assigned to `result` is the output. No file, network or process access."
    )
    category = "code"
    config_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "required": ["code"],
        "properties": {
            "code": {"type": "string", "minLength": 1, "maxLength": MAX_CODE_CHARS, "description": "Python source"},
        },
        "additionalProperties": True,
        "description": "Keys other than `code` are default values of variables.",
    }
    inputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "additionalProperties": True,
        "properties": {},
        "description": (
            "Any name: each becomes a variable of the code, except tenant_id, session_id, execution_id "
            "and workflow_id, which are always the execution's own."
        ),
    }
    outputs_schema: ClassVar[JsonSchema] = {
        "type": "object",
        "properties": {"result": {"description": "the value the code assigned to `result` (JSON)"}},
    }
    open_inputs = True
    # The sandbox allows no I/O, so a rerun cannot have side effects.
    retry_safe = True
    default_timeout = 30.0
    max_timeout = 300.0

    @classmethod
    def validate_config(cls, config: Mapping[str, Any], path: str) -> list[Violation]:
        problems = super().validate_config(config, path)
        code = config.get("code")
        if isinstance(code, str) and code and len(code) <= MAX_CODE_CHARS:
            try:
                # Compiling only parses; nothing in the code runs here.
                compile(code, "<node>", "exec", dont_inherit=True)
            except SyntaxError as exc:
                # The message may quote the code (a name, a literal): only its start.
                where = f" (line {exc.lineno})" if exc.lineno is not None else ""
                problems.append((f"{path}.code", f"SyntaxError: {cut(exc.msg, SHOWN_CHARS)}{where}"))
            except (ValueError, RecursionError, MemoryError) as exc:
                problems.append((f"{path}.code", f"cannot be compiled: {type(exc).__name__}"))
        return problems

    @classmethod
    def required_inputs(cls, config: Mapping[str, Any]) -> set[str]:
        # The code's free variables: names it reads but never binds, less the execution's own
        # (bound by `run`). Its config's strings are not substituted: `${name}` needs nothing.
        code = config.get("code")
        return free_variables(code) - EXECUTION_VARIABLE_NAMES if isinstance(code, str) else set()

    @classmethod
    def reads(cls, config: Mapping[str, Any]) -> set[str] | None:
        return None  # every input is a variable of the code

    def prepare(self, config: Mapping[str, Any]) -> str:
        return str(config["code"])

    async def run(self, ctx: NodeContext, prepared: Any, params: dict[str, Any]) -> dict[str, Any]:
        pool = ctx.services.sandbox
        if pool is None:
            raise NodeError("no sandbox pool is running in this server", reason="SANDBOX_UNAVAILABLE")
        variables = {k: v for k, v in params.items() if k != "code" and k not in EXECUTION_VARIABLE_NAMES}
        variables.update(own_variables(ctx, params))
        try:
            result = await pool.run(prepared, variables, tenant=ctx.tenant, timeout=ctx.remaining)
        except sandbox_errors.SandboxTimeout as exc:
            raise NodeError(str(exc), reason=exc.reason, retryable=False) from None
        except sandbox_errors.SandboxCrashed as exc:
            # The worker died under the code (not a policy refusal): another
            # attempt, on a fresh worker, may succeed.
            raise NodeError(str(exc), reason=exc.reason, retryable=True) from None
        except sandbox_errors.SandboxError as exc:
            raise NodeError(str(exc), reason=exc.reason, retryable=False) from None
        return {"result": result}


def own_variables(ctx: NodeContext, params: Mapping[str, Any]) -> dict[str, Any]:
    """The execution's variables the code sees: from the run (the walk's `Parameters.variables`)
    and the node's context, never from a parameter. Outside a run (no variables) only the two the
    context knows are bound."""
    given = getattr(params, "variables", None) or {}
    own = {name: given[name] for name in EXECUTION_VARIABLE_NAMES if name in given}
    own["tenant_id"] = ctx.tenant
    own["execution_id"] = ctx.execution_id
    return own
