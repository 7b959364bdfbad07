-- What a target accepts: protocol versions with their suites, a weak suite, the
-- OCSP staple (JSON).
ALTER TABLE tls_certificates ADD COLUMN tls TEXT NOT NULL DEFAULT '{}';
-- Which probe an audit job's tunnel carries.
ALTER TABLE tunnel_jobs ADD COLUMN probe TEXT NOT NULL DEFAULT '"handshake"';

-- Audits run on their own: targets re-scanned through an agent every interval.
-- An instance takes a due schedule by moving its next_run on (compare and set),
-- so each run happens once in a cluster.
CREATE TABLE scan_schedules (
    id          TEXT PRIMARY KEY,
    agent_id    TEXT   NOT NULL,
    targets     TEXT   NOT NULL,
    interval_ms BIGINT NOT NULL,
    next_run    BIGINT NOT NULL,
    created_by  TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    last_run    BIGINT NOT NULL DEFAULT 0,
    last_ok     BIGINT NOT NULL DEFAULT 0,
    last_failed BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX scan_schedules_next_run ON scan_schedules (next_run);

-- Every scan of a target, newest kept: its certificate (empty when the scan
-- failed), whether that changed since the scan before, its findings' codes.
CREATE TABLE tls_scan_history (
    agent_id    TEXT   NOT NULL,
    target      TEXT   NOT NULL,
    scanned_at  BIGINT NOT NULL,
    fingerprint TEXT   NOT NULL DEFAULT '',
    error       TEXT   NOT NULL DEFAULT '',
    changed     BIGINT NOT NULL DEFAULT 0,
    findings    TEXT   NOT NULL DEFAULT '[]'
);
CREATE INDEX tls_scan_history_target ON tls_scan_history (agent_id, target, scanned_at);
