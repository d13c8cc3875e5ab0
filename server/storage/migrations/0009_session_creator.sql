-- Who created each session, so that callers without the admin role list
-- only their own. Sessions from before are nobody's: admins still see them.
ALTER TABLE sessions ADD COLUMN creator TEXT NOT NULL DEFAULT '';
CREATE INDEX sessions_by_creator_time ON sessions (tenant, creator, create_us DESC, session_id DESC);
