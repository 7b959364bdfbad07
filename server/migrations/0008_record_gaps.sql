-- Records lost on the way, counted by the numbers plugins give their records.

-- With each agent's stream mark, where every plugin run's numbering stood when
-- the mark was taken: JSON {"complete": bool, "runs": {"<plugin>": [instance,
-- last seq], ...}}; empty when not known.
ALTER TABLE stream_marks ADD COLUMN sources TEXT NOT NULL DEFAULT '{}';

-- Records of the plugin found missing by a gap in their numbers.
ALTER TABLE agent_plugins ADD COLUMN lost_records BIGINT NOT NULL DEFAULT 0;
