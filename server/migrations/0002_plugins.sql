-- Plugin packages, desired plugin sets and reported plugin state.

-- A package of a component version. arch 'any' fits every agent.
CREATE TABLE component_packages (
    name       TEXT   NOT NULL,
    version    TEXT   NOT NULL,
    arch       TEXT   NOT NULL,
    kind       TEXT   NOT NULL,
    sha256     TEXT   NOT NULL,
    signature  TEXT   NOT NULL,
    size       BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by TEXT   NOT NULL,
    PRIMARY KEY (name, version, arch, kind)
);

-- Agents whose plugin set the server manages; a managed set may be empty.
CREATE TABLE agent_plugin_sets (
    agent_id   TEXT PRIMARY KEY,
    updated_at BIGINT NOT NULL,
    updated_by TEXT   NOT NULL
);

CREATE TABLE agent_plugin_desired (
    agent_id TEXT NOT NULL,
    name     TEXT NOT NULL,
    version  TEXT NOT NULL,
    detail   TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (agent_id, name)
);

-- The latest plugin heartbeat (1001) per agent and plugin.
CREATE TABLE agent_plugins (
    agent_id   TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    version    TEXT   NOT NULL DEFAULT '',
    state      TEXT   NOT NULL DEFAULT '',
    pid        BIGINT,
    heartbeat  TEXT   NOT NULL DEFAULT '{}',
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (agent_id, name)
);
