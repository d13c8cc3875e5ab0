"""Webhooks: durable, signed delivery of events to HTTP receivers."""
