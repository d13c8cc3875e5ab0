"""Global rate limits: Envoy's rate limit service, with counters in Redis."""
