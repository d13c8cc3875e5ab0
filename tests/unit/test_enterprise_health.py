"""`/enterprise/health` under Kailash's component names: what tenants registered shows, but does not
decide the gateway's own status (as in GET /health)."""

from __future__ import annotations

from flowport.server.api.enterprise import enterprise_health
from flowport.v1 import gateway_pb2


def _health(**components: str) -> gateway_pb2.Health:
    health = gateway_pb2.Health(status="healthy")
    health.timestamp.GetCurrentTime()
    for name, status in components.items():
        health.components[name].status = status
    return health


def test_a_tenants_failing_database_pool_shows_but_leaves_the_status_healthy() -> None:
    answer = enterprise_health(_health(database_pools="degraded", sandbox="healthy"), secrets_loaded=True)
    assert answer.components["resources"].status == "degraded"
    assert answer.status == "healthy"


def test_the_gateways_own_components_still_decide_it() -> None:
    answer = enterprise_health(_health(sandbox="unhealthy"), secrets_loaded=True)
    assert answer.components["async_runtime"].status == "unhealthy"
    assert answer.status != "healthy"
    assert enterprise_health(_health(), secrets_loaded=False).status != "healthy"
