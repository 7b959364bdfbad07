-- A task sent to one agent ends `timed_out` when no answer came by its deadline
-- (Unix ms). Tasks already waiting get the default ten minutes from their creation.
ALTER TABLE tasks ADD COLUMN deadline BIGINT;
UPDATE tasks SET deadline = created_at + 600000 WHERE job_id IS NULL AND status = 'sent';
CREATE INDEX tasks_deadline ON tasks (status, deadline);
