"""`${tenant_id}`, `${session.tenant_id}` and the other execution variables in node configs, and the
variables of the same names in PythonCodeNode code."""

from __future__ import annotations

from typing import Any, cast

import pytest

from flowport.server.nodes.base import NodeContext, NodeError, NodeServices
from flowport.server.nodes.python_code import PythonCodeNode
from flowport.server.nodes.substitution import (
    Parameters,
    execution_variables,
    input_references,
    is_execution_variable,
    substitute,
)

VARIABLES = execution_variables("acme", "s-1", "e-1", "wf")


def test_variables_resolve_as_kailash_configs_write_them() -> None:
    params = Parameters({"status": "active"}, VARIABLES)
    config = {
        "tenant_context": {"id": "${tenant_id}"},
        "query_params": {"tenant_id": "${session.tenant_id}", "status": "${status}"},
        "url": "https://x.example/${workflow_id}/${execution_id}?s=${session_id}",
    }
    assert substitute(config, params) == {
        "tenant_context": {"id": "acme"},
        "query_params": {"tenant_id": "acme", "status": "active"},
        "url": "https://x.example/wf/e-1?s=s-1",
    }


def test_an_input_cannot_pose_as_another_tenant() -> None:
    params = Parameters({"tenant_id": "other", "session": {"tenant_id": "other", "user_id": "u"}}, VARIABLES)
    assert substitute(["${tenant_id}", "${session.tenant_id}"], params) == ["acme", "acme"]
    # What the variables do not define still comes from the parameters.
    assert substitute("${session.user_id}", params) == "u"


def test_plain_parameters_have_no_variables() -> None:
    with pytest.raises(NodeError) as raised:
        substitute("${tenant_id}", {"x": 1})
    assert raised.value.reason == "UNRESOLVED_REFERENCE"


def test_the_inputs_references_need_leave_out_variables_secrets_and_escapes() -> None:
    config = {
        "url": "https://x.example/${tenant_id}/${workflow_id}/${order.id}?s=${session.id}&u=${session.user_id}",
        "headers": {"Authorization": "Bearer ${ api_token }", "X-Key": "${secret:KEY}", "X-Literal": "$${lit}"},
        "body": ["${execution_id}", "${session_id}", "${session.tenant_id}", "${rows.0.id}", "${}"],
    }
    # `${session.user_id}` is not a variable: the parameters resolve it (see above), so it needs `session`.
    assert input_references(config) == {"api_token", "order", "session", "rows"}
    assert [is_execution_variable(name) for name in ("tenant_id", "session.id", "session.user_id", "api_token")] == [
        True,
        True,
        False,
        False,
    ]
    # There is no default syntax: `${name:-x}` names a parameter of that name, which is required.
    assert input_references("${name:-x}") == {"name:-x"}


class _EchoSandbox:
    async def run(self, code: str, inputs: dict[str, Any], *, tenant: str, timeout: float | None = None) -> Any:
        return inputs


def _ctx() -> NodeContext:
    return NodeContext("acme", "e-1", "c", 1, 10.0, NodeServices(sandbox=cast(Any, _EchoSandbox())))


async def test_code_gets_the_executions_variables_never_the_parameters_of_those_names() -> None:
    posing = {"tenant_id": "other", "session_id": "s-x", "execution_id": "e-x", "workflow_id": "w-x", "n": 1}
    given = await PythonCodeNode().run(_ctx(), "result = 1", Parameters(posing, VARIABLES))
    assert given["result"] == {
        "tenant_id": "acme",
        "session_id": "s-1",
        "execution_id": "e-1",
        "workflow_id": "wf",
        "n": 1,
    }
    # Outside a run (plain parameters): the context's two, and no parameter poses as the others.
    given = await PythonCodeNode().run(_ctx(), "result = 1", dict(posing))
    assert given["result"] == {"tenant_id": "acme", "execution_id": "e-1", "n": 1}
    # Never required inputs of the code.
    code = "result = [tenant_id, session_id, execution_id, workflow_id, session, n]"
    assert PythonCodeNode.required_inputs({"code": code}) == {"session", "n"}
