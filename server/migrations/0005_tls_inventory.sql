-- The TLS inventory: the certificate each scanned target presents, as seen
-- through an agent's proxy plugin. One row per (agent, target), updated by each
-- scan; first_seen and the fingerprint tell when it changed.

CREATE TABLE tls_certificates (
    agent_id      TEXT   NOT NULL,
    target        TEXT   NOT NULL,
    fingerprint   TEXT   NOT NULL,
    subject       TEXT   NOT NULL,
    issuer        TEXT   NOT NULL,
    names         TEXT   NOT NULL DEFAULT '[]',
    serial        TEXT   NOT NULL,
    not_before    BIGINT NOT NULL,
    not_after     BIGINT NOT NULL,
    public_key    TEXT   NOT NULL,
    signature     TEXT   NOT NULL,
    chain_length  BIGINT NOT NULL,
    self_signed   BIGINT NOT NULL,
    first_seen    BIGINT NOT NULL,
    last_seen     BIGINT NOT NULL,
    PRIMARY KEY (agent_id, target)
);
CREATE INDEX tls_certificates_not_after ON tls_certificates (not_after);
