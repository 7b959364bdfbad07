-- file-delivery pushes: one operation fanned out to many agents. Each agent's
-- share keeps its sealed parts (ciphertext only: the keeper sealed them to the
-- host) in file_push_parts until they were all answered, so an agent offline
-- at the push gets them when it comes back. An instance takes a share by
-- compare and set on its state and claim time, and writes to it only while it
-- holds the claim, so each part is sent by one instance at a time.
CREATE TABLE file_pushes (
    id              TEXT PRIMARY KEY,
    created_by      TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    deadline        BIGINT NOT NULL,
    part_timeout_ms BIGINT NOT NULL
);

CREATE TABLE file_push_agents (
    push_id     TEXT    NOT NULL,
    agent_id    TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    part_count  INTEGER NOT NULL,
    sent_parts  INTEGER NOT NULL DEFAULT 0,
    content_bytes BIGINT NOT NULL,
    files       TEXT    NOT NULL,
    results     TEXT    NOT NULL DEFAULT '[]',
    detail      TEXT    NOT NULL DEFAULT '',
    claimed_by  TEXT    NOT NULL DEFAULT '',
    claimed_at  BIGINT  NOT NULL DEFAULT 0,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (push_id, agent_id)
);
CREATE INDEX file_push_agents_state ON file_push_agents (state);

-- Each share's parts, read one at a time as they are sent; dropped once the
-- share ends.
CREATE TABLE file_push_parts (
    push_id  TEXT    NOT NULL,
    agent_id TEXT    NOT NULL,
    idx      INTEGER NOT NULL,
    data     TEXT    NOT NULL,
    PRIMARY KEY (push_id, agent_id, idx)
);

-- Which version of which file each host should have (the newest pushed) and
-- has (as its inventory or a delivery's answer last said).
CREATE TABLE file_status (
    agent_id       TEXT   NOT NULL,
    name           TEXT   NOT NULL,
    wanted_version BIGINT NOT NULL DEFAULT 0,
    wanted_removed INTEGER NOT NULL DEFAULT 0,
    held_version   BIGINT NOT NULL DEFAULT 0,
    held_state     TEXT   NOT NULL DEFAULT '',
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (agent_id, name)
);
