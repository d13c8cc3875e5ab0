"""Which creates Envoy may retry on another server because the server deduplicates them by
request_id: never one whose replay answers differently from the first call."""

from __future__ import annotations

from flowport.transcoder.request_ids import request_id_fields


def test_creates_replayed_alike_are_retried_and_a_new_keys_secret_is_never_lost() -> None:
    fields = request_id_fields()
    assert "/flowport.v1.ExecutionService/CreateExecution" in fields
    assert "/flowport.v1.SessionService/CreateSession" in fields
    # A retry of CreateApiKey would answer "created" without the secret, shown only once.
    assert "/flowport.v1.ApiKeyService/CreateApiKey" not in fields
