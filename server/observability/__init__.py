"""What operators see: structured logs, Prometheus metrics, OpenTelemetry traces."""
