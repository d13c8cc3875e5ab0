-- The SQLite schema after every migration: generated, do not edit.
-- python -m flowport.server.storage.sqlite_snapshot rewrites it.
-- versions: 1:sessions,2:workflows_executions,3:events,4:webhooks,5:api_keys,6:event_id_reservation,7:secrets,8:audit,9:session_creator,10:execution_leases,11:delivery_leases,12:services,13:resources,14:event_purge_mark,15:session_counts,16:session_owners,17:webhook_creators,18:execution_retention,19:workflow_numbers,20:event_purge_marks,21:workflow_cache,22:execution_bytes,23:request_id_bytes,24:workflow_tenant_changes
CREATE TABLE api_keys (
	key_id TEXT NOT NULL, 
	tenant TEXT NOT NULL, 
	key_hash BLOB NOT NULL, 
	create_us BIGINT NOT NULL, 
	expire_us BIGINT, 
	revoke_us BIGINT, 
	body BLOB NOT NULL, 
	PRIMARY KEY (key_id), 
	UNIQUE (key_hash)
);
CREATE TABLE audit_log (
	audit_id TEXT NOT NULL, 
	time_us BIGINT NOT NULL, 
	action TEXT NOT NULL, 
	code TEXT NOT NULL, 
	tenant TEXT NOT NULL, 
	resource_tenant TEXT NOT NULL, 
	subject TEXT NOT NULL, 
	body BLOB NOT NULL, 
	PRIMARY KEY (audit_id)
);
CREATE TABLE event_id_reservation (
	id BIGINT NOT NULL, 
	reserved_until BIGINT NOT NULL, purged_through BIGINT DEFAULT '0' NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT one_row CHECK (id = 1)
);
INSERT INTO "event_id_reservation" VALUES(1,0,0);
CREATE TABLE event_purge_marks (
	tenant TEXT NOT NULL, 
	purged_through BIGINT NOT NULL, 
	PRIMARY KEY (tenant)
);
CREATE TABLE events (
	id INTEGER NOT NULL, 
	tenant TEXT NOT NULL, 
	type TEXT NOT NULL, 
	time_us BIGINT NOT NULL, 
	session_id TEXT NOT NULL, 
	workflow_id TEXT NOT NULL, 
	execution_id TEXT NOT NULL, 
	data BLOB NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE execution_bytes (
	tenant TEXT NOT NULL, 
	shard INTEGER NOT NULL, 
	bytes BIGINT NOT NULL, 
	PRIMARY KEY (tenant, shard)
);
CREATE TABLE executions (
	tenant TEXT NOT NULL, 
	execution_id TEXT NOT NULL, 
	workflow_id TEXT NOT NULL, 
	session_id TEXT NOT NULL, 
	state BIGINT NOT NULL, 
	create_us BIGINT NOT NULL, 
	body BLOB NOT NULL, owner TEXT DEFAULT '' NOT NULL, lease_until_us BIGINT DEFAULT '0' NOT NULL, session_creator TEXT DEFAULT '' NOT NULL, 
	PRIMARY KEY (execution_id)
);
CREATE TABLE idempotency (
	tenant TEXT NOT NULL, 
	method TEXT NOT NULL, 
	request_id TEXT NOT NULL, 
	request_hash BLOB NOT NULL, 
	response BLOB NOT NULL, 
	create_us BIGINT NOT NULL, 
	PRIMARY KEY (tenant, method, request_id)
);
CREATE TABLE request_id_bytes (
	tenant TEXT NOT NULL, 
	shard INTEGER NOT NULL, 
	bytes BIGINT NOT NULL, 
	PRIMARY KEY (tenant, shard)
);
CREATE TABLE resources (
	tenant TEXT NOT NULL, 
	name TEXT NOT NULL, 
	update_us BIGINT NOT NULL, 
	body BLOB NOT NULL, 
	PRIMARY KEY (tenant, name)
);
CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_us BIGINT NOT NULL);
CREATE TABLE secrets (
	tenant TEXT NOT NULL, 
	name TEXT NOT NULL, 
	description TEXT NOT NULL, 
	version BIGINT NOT NULL, 
	create_us BIGINT NOT NULL, 
	update_us BIGINT NOT NULL, 
	key_id TEXT NOT NULL, 
	sealed BLOB NOT NULL, 
	PRIMARY KEY (tenant, name)
);
CREATE TABLE services (
	tenant TEXT NOT NULL, 
	service_id TEXT NOT NULL, 
	provider TEXT NOT NULL, 
	expire_us BIGINT NOT NULL, 
	create_us BIGINT NOT NULL, 
	body BLOB NOT NULL, 
	PRIMARY KEY (tenant, service_id)
);
CREATE TABLE session_counts (
	tenant TEXT NOT NULL, 
	removed BIGINT NOT NULL, 
	PRIMARY KEY (tenant)
);
CREATE TABLE sessions (
	tenant TEXT NOT NULL, 
	session_id TEXT NOT NULL, 
	user_id TEXT NOT NULL, 
	create_us BIGINT NOT NULL, 
	expire_us BIGINT NOT NULL, 
	body BLOB NOT NULL, creator TEXT DEFAULT '' NOT NULL, 
	PRIMARY KEY (session_id)
);
CREATE TABLE webhook_deliveries (
	delivery_id TEXT NOT NULL, 
	tenant TEXT NOT NULL, 
	webhook_id TEXT NOT NULL, 
	event_id TEXT NOT NULL, 
	event_type TEXT NOT NULL, 
	state BIGINT NOT NULL, 
	attempts BIGINT DEFAULT '0' NOT NULL, 
	last_status_code BIGINT DEFAULT '0' NOT NULL, 
	last_error TEXT DEFAULT '' NOT NULL, 
	last_duration_us BIGINT DEFAULT '0' NOT NULL, 
	next_attempt_us BIGINT, 
	create_us BIGINT NOT NULL, 
	update_us BIGINT NOT NULL, 
	payload BLOB NOT NULL, owner TEXT DEFAULT '' NOT NULL, lease_until_us BIGINT DEFAULT '0' NOT NULL, 
	PRIMARY KEY (delivery_id)
);
CREATE TABLE webhooks (
	tenant TEXT NOT NULL, 
	webhook_id TEXT NOT NULL, 
	create_us BIGINT NOT NULL, 
	secret BLOB, 
	body BLOB NOT NULL, creator TEXT DEFAULT '' NOT NULL, session_scope TEXT, 
	PRIMARY KEY (tenant, webhook_id)
);
CREATE TABLE workflow_cache_acks (
	owner TEXT NOT NULL, 
	seen BIGINT NOT NULL, 
	until_us BIGINT NOT NULL, 
	PRIMARY KEY (owner)
);
CREATE TABLE workflow_changes (
	id BIGINT NOT NULL, 
	seq BIGINT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT one_change_counter CHECK (id = 1)
);
INSERT INTO "workflow_changes" VALUES(1,0);
CREATE TABLE workflow_numbers (
	tenant TEXT NOT NULL, 
	workflow_id TEXT NOT NULL, 
	last_version BIGINT NOT NULL, 
	PRIMARY KEY (tenant, workflow_id)
);
CREATE TABLE workflow_tenant_changes (
	tenant TEXT NOT NULL, 
	seq BIGINT NOT NULL, 
	PRIMARY KEY (tenant)
);
CREATE TABLE workflows (
	tenant TEXT NOT NULL, 
	workflow_id TEXT NOT NULL, 
	version BIGINT NOT NULL, 
	session_id TEXT NOT NULL, 
	create_us BIGINT NOT NULL, 
	deleted_us BIGINT, 
	body BLOB NOT NULL, session_creator TEXT DEFAULT '' NOT NULL, 
	PRIMARY KEY (tenant, workflow_id, version)
);
CREATE INDEX sessions_by_tenant_time ON sessions (tenant, create_us DESC, session_id DESC);
CREATE INDEX sessions_by_expiry ON sessions (expire_us);
CREATE INDEX idempotency_by_time ON idempotency (create_us);
CREATE INDEX executions_by_tenant_time ON executions (tenant, create_us DESC, execution_id DESC);
CREATE INDEX executions_by_workflow ON executions (tenant, workflow_id, create_us DESC);
CREATE INDEX executions_unfinished ON executions (state) WHERE state IN (1, 2);
CREATE INDEX events_by_tenant ON events (tenant, id);
CREATE INDEX events_by_time ON events (time_us);
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (tenant, webhook_id, create_us DESC, delivery_id DESC);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_us) WHERE state IN (1, 2);
CREATE INDEX webhook_deliveries_finished ON webhook_deliveries (update_us) WHERE state IN (3, 4);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant, create_us DESC);
CREATE INDEX secrets_by_key ON secrets (key_id);
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
CREATE INDEX sessions_by_creator_time ON sessions (tenant, creator, create_us DESC, session_id DESC);
CREATE INDEX executions_leases ON executions (lease_until_us) WHERE state IN (1, 2);
CREATE INDEX webhook_deliveries_leases ON webhook_deliveries (lease_until_us) WHERE state IN (1, 2);
CREATE INDEX executions_by_session ON executions (tenant, session_id) WHERE session_id <> '';
CREATE INDEX workflows_by_session ON workflows (tenant, session_id) WHERE session_id <> '';
CREATE INDEX executions_ended_by_time ON executions (create_us) WHERE state IN (3, 4, 5);
CREATE TRIGGER executions_bytes_inserted AFTER INSERT ON executions BEGIN INSERT INTO execution_bytes (tenant, shard, bytes) VALUES (NEW.tenant, 0, length(NEW.body)) ON CONFLICT (tenant, shard) DO UPDATE SET bytes = bytes + excluded.bytes; END;
CREATE TRIGGER executions_bytes_updated AFTER UPDATE OF body ON executions WHEN length(NEW.body) <> length(OLD.body) BEGIN INSERT INTO execution_bytes (tenant, shard, bytes) VALUES (NEW.tenant, 0, length(NEW.body) - length(OLD.body)) ON CONFLICT (tenant, shard) DO UPDATE SET bytes = bytes + excluded.bytes; END;
CREATE TRIGGER executions_bytes_deleted AFTER DELETE ON executions BEGIN INSERT INTO execution_bytes (tenant, shard, bytes) VALUES (OLD.tenant, 0, -length(OLD.body)) ON CONFLICT (tenant, shard) DO UPDATE SET bytes = bytes + excluded.bytes; END;
CREATE INDEX idempotency_by_tenant ON idempotency (tenant, create_us);
CREATE TRIGGER idempotency_bytes_inserted AFTER INSERT ON idempotency BEGIN INSERT INTO request_id_bytes (tenant, shard, bytes) VALUES (NEW.tenant, 0, (length(NEW.response) + length(NEW.request_id) + length(NEW.method) + 64)) ON CONFLICT (tenant, shard) DO UPDATE SET bytes = bytes + excluded.bytes; END;
CREATE TRIGGER idempotency_bytes_deleted AFTER DELETE ON idempotency BEGIN INSERT INTO request_id_bytes (tenant, shard, bytes) VALUES (OLD.tenant, 0, -(length(OLD.response) + length(OLD.request_id) + length(OLD.method) + 64)) ON CONFLICT (tenant, shard) DO UPDATE SET bytes = bytes + excluded.bytes; END;
CREATE INDEX workflow_tenant_changes_by_seq ON workflow_tenant_changes (seq);
