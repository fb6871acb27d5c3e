-- cio_logging schema version 2: whose call each queued row is, so the sender reads a
-- person's calls in the order they were committed (see read_due in queries.sql).
-- Rows queued by version 1 get their person from their text (see rows.py: customer_id
-- is the row's third value, anonymous_id its fourth).
ALTER TABLE cio_queue ADD COLUMN IF NOT EXISTS person text;
UPDATE cio_queue
SET person = coalesce('c:' || (body::jsonb ->> 2), 'a:' || (body::jsonb ->> 3))
WHERE person IS NULL AND left(body, 1) = '[';
CREATE INDEX IF NOT EXISTS cio_queue_person ON cio_queue (workspace, person, seq);
