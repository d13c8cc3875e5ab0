"""The gRPC services: one module per service in proto/flowport/v1/."""
