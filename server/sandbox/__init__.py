"""Sandboxed execution of user Python code in warm worker processes."""
