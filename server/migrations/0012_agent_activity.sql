-- What an agent's page shows beyond its last heartbeat, and what the agent
-- list searches.

-- The agent's addresses as plain text, space-separated, for search (the
-- `addresses` column is JSON, whose keys would match too).
ALTER TABLE agents ADD COLUMN address_text TEXT NOT NULL DEFAULT '';

-- A sample of its heartbeats: at most one per agent every few minutes, kept for a
-- day (the server prunes older rows). CPU in hundredths of a percent and records
-- per second in thousandths, so that every column is an integer on both engines.
CREATE TABLE agent_samples (
    agent_id      TEXT   NOT NULL,
    at            BIGINT NOT NULL,
    cpu_centi     BIGINT NOT NULL,
    rss           BIGINT NOT NULL,
    records_milli BIGINT NOT NULL,
    spool_bytes   BIGINT NOT NULL,
    PRIMARY KEY (agent_id, at)
);
CREATE INDEX agent_samples_at ON agent_samples (at);

-- Its streams: when each opened and closed, at which instance; the newest 50
-- per agent are kept.
CREATE TABLE agent_sessions (
    agent_id        TEXT   NOT NULL,
    connected_at    BIGINT NOT NULL,
    disconnected_at BIGINT,
    instance        TEXT   NOT NULL,
    PRIMARY KEY (agent_id, connected_at)
);
-- The streams an instance leaves open when it stops, found without a scan.
CREATE INDEX agent_sessions_open ON agent_sessions (instance) WHERE disconnected_at IS NULL;
