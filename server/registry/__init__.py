"""The service registry's background work: checking registered endpoints' health."""
