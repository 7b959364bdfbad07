-- Enrollment by key: the name the key database gives an agent.

ALTER TABLE agents ADD COLUMN name TEXT NOT NULL DEFAULT '';
CREATE INDEX agents_name ON agents (name);
