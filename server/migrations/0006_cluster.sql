-- Several keel-server instances on one database.

-- Each running instance, with a lease it renews; an instance whose lease has
-- passed is dead, and the agents it held are offline.
CREATE TABLE instances (
    id          TEXT PRIMARY KEY,
    started_at  BIGINT NOT NULL,
    lease_until BIGINT NOT NULL,
    grpc        TEXT   NOT NULL DEFAULT '',
    http        TEXT   NOT NULL DEFAULT '',
    agents      BIGINT NOT NULL DEFAULT 0
);

-- The instance holding the agent's stream while `online` is 1.
ALTER TABLE agents ADD COLUMN instance TEXT;
CREATE INDEX agents_instance ON agents (instance);

-- The instance driving a running task, until its lease on it passes.
ALTER TABLE jobs ADD COLUMN driver TEXT;
ALTER TABLE jobs ADD COLUMN driver_until BIGINT NOT NULL DEFAULT 0;

-- Outstanding challenges of enrollment by key, by the SHA-256 of the nonce.
CREATE TABLE enroll_challenges (
    nonce_sha256 TEXT PRIMARY KEY,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX enroll_challenges_expires ON enroll_challenges (expires_at);

-- Audit jobs waiting for their tunnels: a tunnel may reach any instance.
CREATE TABLE tunnel_jobs (
    job          TEXT PRIMARY KEY,
    agent_id     TEXT   NOT NULL,
    token_sha256 TEXT   NOT NULL,
    instance     TEXT   NOT NULL,
    target       TEXT   NOT NULL,
    expires_at   BIGINT NOT NULL
);
CREATE INDEX tunnel_jobs_instance ON tunnel_jobs (instance);
