-- Event ids are reserved in blocks before they are handed out, so a crash
-- (events seen live but not yet written) or a purge that empties the log
-- never makes the server hand out an id again.
CREATE TABLE event_id_reservation (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    reserved_until  INTEGER NOT NULL
);
INSERT INTO event_id_reservation VALUES (1, 0);
