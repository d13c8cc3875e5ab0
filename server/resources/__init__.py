"""Shared resources: a tenant's named database pools and HTTP client profiles."""
