-- The event log: every event, by increasing id, kept for a retention window.
CREATE TABLE events (
    id            INTEGER PRIMARY KEY,  -- assigned by the server, increasing
    tenant        TEXT    NOT NULL,
    type          TEXT    NOT NULL,
    time_us       INTEGER NOT NULL,
    session_id    TEXT    NOT NULL,
    workflow_id   TEXT    NOT NULL,
    execution_id  TEXT    NOT NULL,
    data          BLOB    NOT NULL      -- the event's data object, JSON
);
CREATE INDEX events_by_tenant ON events (tenant, id);
CREATE INDEX events_by_time ON events (time_us);
