"""The workflow engine: from a workflow config to a finished execution.

`validation` checks a config and names every problem's field; `plan` compiles
it once into the order nodes run in; `executor` runs executions durably (each
state change written and published, resumed or failed after a restart) and
`work_queue` hands them between processes; `registry` knows the node types.
"""
