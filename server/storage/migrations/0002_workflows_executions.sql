-- Workflow versions and executions.
CREATE TABLE workflows (
    tenant       TEXT    NOT NULL,
    workflow_id  TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    session_id   TEXT    NOT NULL,
    create_us    INTEGER NOT NULL,
    deleted_us   INTEGER,           -- set on delete; executions may still need the version
    body         BLOB    NOT NULL,  -- flowport.v1.Workflow, serialized
    PRIMARY KEY (tenant, workflow_id, version)
);

CREATE TABLE executions (
    tenant        TEXT    NOT NULL,
    execution_id  TEXT    NOT NULL PRIMARY KEY,
    workflow_id   TEXT    NOT NULL,
    session_id    TEXT    NOT NULL,
    state         INTEGER NOT NULL,  -- flowport.v1.Execution.State
    create_us     INTEGER NOT NULL,
    body          BLOB    NOT NULL   -- flowport.v1.Execution, serialized
);
CREATE INDEX executions_by_tenant_time ON executions (tenant, create_us DESC, execution_id DESC);
CREATE INDEX executions_by_workflow ON executions (tenant, workflow_id, create_us DESC);
-- Only PENDING (1) and RUNNING (2) executions are looked up at start-up.
CREATE INDEX executions_unfinished ON executions (state) WHERE state IN (1, 2);
