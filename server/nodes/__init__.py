"""Node types: what a workflow's nodes can do."""
