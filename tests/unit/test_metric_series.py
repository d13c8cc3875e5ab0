"""The execution histogram's series stay bounded however many workflow ids a tenant makes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from flowport.server.observability import prometheus
from flowport.server.observability.prometheus import Prometheus


def _workflows(exposition: bytes, tenant: str) -> set[str]:
    return {
        sample.labels["workflow"]
        for family in text_string_to_metric_families(exposition.decode())
        if family.name == "flowport_execution_duration_seconds"
        for sample in family.samples
        if sample.labels.get("tenant") == tenant and "workflow" in sample.labels
    }


def test_a_tenants_workflows_past_its_series_share_one() -> None:
    metrics = Prometheus()
    for n in range(prometheus.WORKFLOWS_PER_TENANT + 50):
        metrics.execution_ended("greedy", f"w{n}", "succeeded", 0.01)
    metrics.execution_ended("greedy", "w0", "failed", 0.01)  # a workflow already labelled stays so
    metrics.execution_ended("other", "mine", "succeeded", 0.01)
    exposed = metrics.exposition()
    greedy = _workflows(exposed, "greedy")
    assert len(greedy) == prometheus.WORKFLOWS_PER_TENANT + 1 and prometheus.OTHER_WORKFLOWS in greedy
    assert "w0" in greedy and "w149" not in greedy
    assert _workflows(exposed, "other") == {"mine"}, "another tenant's series are its own"
