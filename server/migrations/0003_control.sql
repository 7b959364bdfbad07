-- Control plane: audit log, policies, and tasks with one subtask per agent.

CREATE TABLE audit (
    id      TEXT PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT   NOT NULL,
    action  TEXT   NOT NULL,
    target  TEXT   NOT NULL,
    status  BIGINT NOT NULL,
    outcome TEXT   NOT NULL
);
CREATE INDEX audit_at ON audit (at);

CREATE TABLE policies (
    id         TEXT PRIMARY KEY,
    name       TEXT   NOT NULL UNIQUE,
    component  TEXT   NOT NULL,
    version    TEXT   NOT NULL,
    detail     TEXT   NOT NULL DEFAULT '',
    target     TEXT   NOT NULL,
    created_by TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);

-- A task: a command rolled out to many agents in batches.
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    kind              TEXT   NOT NULL,
    spec              TEXT   NOT NULL,
    state             TEXT   NOT NULL,
    reason            TEXT   NOT NULL DEFAULT '',
    batch_size        BIGINT NOT NULL,
    failure_threshold TEXT   NOT NULL,
    timeout_ms        BIGINT NOT NULL,
    baseline_done     BIGINT NOT NULL DEFAULT 0,
    baseline_failed   BIGINT NOT NULL DEFAULT 0,
    created_by        TEXT   NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);

-- The existing per-agent task rows become the subtasks of a job (or stand alone).
ALTER TABLE tasks ADD COLUMN job_id TEXT;
ALTER TABLE tasks ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN sent_at BIGINT;
CREATE INDEX tasks_job ON tasks (job_id, status);
