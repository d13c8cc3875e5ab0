"""Runnable examples of extending and calling flowport."""
