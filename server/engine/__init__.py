"""The workflow engine: from a workflow config to a finished execution.

`validation` checks a config and names every problem's field; `plan` compiles
it once into the order nodes run in; `executor` runs executions durably (each
state change written and published, resumed or failed after a restart) and
`work_queue` hands them between processes (`redis_work_queue`, with Redis);
`registry` knows the node types.
The executor is composed of `walk` (one execution's nodes), `slots` (this
process's share of the work), `takeover` (recovery, executions of processes
that died, the work queue) and `elsewhere` (waits and cancels of executions
another process runs); `run` is the execution in progress they share.
"""
