-- The audit log: append-only. Rows are inserted and read, never changed:
-- the triggers refuse UPDATE and DELETE, so not even a bug in flowport
-- (or a SQL node pointed at this file) can rewrite history through SQL.
CREATE TABLE audit_log (
    audit_id         TEXT    NOT NULL PRIMARY KEY,  -- aud_<ULID>
    time_us          INTEGER NOT NULL,
    action           TEXT    NOT NULL,
    code             TEXT    NOT NULL,              -- gRPC status code name
    tenant           TEXT    NOT NULL,              -- the caller's; '' when unauthenticated
    resource_tenant  TEXT    NOT NULL,
    subject          TEXT    NOT NULL,
    body             BLOB    NOT NULL               -- flowport.v1.AuditEvent, serialized
);
CREATE INDEX audit_log_by_time ON audit_log (time_us DESC, audit_id DESC);
CREATE INDEX audit_log_by_tenant ON audit_log (tenant, time_us DESC);
CREATE INDEX audit_log_by_resource_tenant ON audit_log (resource_tenant, time_us DESC);
CREATE INDEX audit_log_by_action ON audit_log (action, time_us DESC);

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be updated');
END;

CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only: rows cannot be deleted');
END;
