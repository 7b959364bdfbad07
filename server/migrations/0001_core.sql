-- Core registry. Times are Unix milliseconds; lists and maps are JSON text.
-- The same SQL runs on SQLite and PostgreSQL: keep it portable.

CREATE TABLE agents (
    id             TEXT PRIMARY KEY,
    hostname       TEXT   NOT NULL DEFAULT '',
    version        TEXT   NOT NULL DEFAULT '',
    product        TEXT   NOT NULL DEFAULT '',
    addresses      TEXT   NOT NULL DEFAULT '{}',
    first_seen     BIGINT NOT NULL,
    last_seen      BIGINT NOT NULL,
    online         BIGINT NOT NULL DEFAULT 0,
    connected_at   BIGINT,
    last_heartbeat BIGINT,
    heartbeat      TEXT   NOT NULL DEFAULT '{}'
);

CREATE TABLE agent_tags (
    agent_id TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    tag      TEXT NOT NULL,
    PRIMARY KEY (agent_id, tag)
);

CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT   NOT NULL UNIQUE,
    role        TEXT   NOT NULL,
    description TEXT   NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT,
    revoked_at  BIGINT
);

CREATE TABLE enrollment_tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT   NOT NULL UNIQUE,
    description TEXT   NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    max_uses    BIGINT NOT NULL,
    uses        BIGINT NOT NULL DEFAULT 0,
    revoked_at  BIGINT
);

CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,
    agent_id      TEXT   NOT NULL,
    issued_at     BIGINT NOT NULL,
    not_after     BIGINT NOT NULL,
    revoked_at    BIGINT,
    revoke_reason TEXT
);
CREATE INDEX certificates_agent ON certificates (agent_id);
CREATE INDEX certificates_revoked ON certificates (revoked_at);

CREATE TABLE tasks (
    token       TEXT PRIMARY KEY,
    agent_id    TEXT   NOT NULL,
    data_type   BIGINT NOT NULL,
    object_name TEXT   NOT NULL,
    data        TEXT   NOT NULL,
    created_by  TEXT   NOT NULL,
    created_at  BIGINT NOT NULL,
    status      TEXT   NOT NULL,
    result      TEXT,
    finished_at BIGINT
);
CREATE INDEX tasks_agent ON tasks (agent_id);

-- Highest batch persisted per agent, so a resent batch is not stored twice.
CREATE TABLE stream_marks (
    agent_id TEXT PRIMARY KEY,
    epoch    TEXT   NOT NULL,
    seq      BIGINT NOT NULL
);
