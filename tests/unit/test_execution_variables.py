"""`${tenant_id}`, `${session.tenant_id}` and the other execution variables in node configs."""

from __future__ import annotations

import pytest

from flowport.server.nodes.base import NodeError
from flowport.server.nodes.substitution import Parameters, execution_variables, substitute

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
