"""Kailash clients against flowport: the seed's examples and Kailash's documented REST, WebSocket and
browser behaviour, through a real Envoy."""
