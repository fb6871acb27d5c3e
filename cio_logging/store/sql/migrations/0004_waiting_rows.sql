-- cio_logging schema version 4: the sender reads a batch per query (see next_batch in
-- postgres.py). A row that failed waits for its retry, and its person's later calls wait
-- for it: those rows alone are indexed by person and by due time, so the check costs an
-- index probe that is usually empty.
CREATE INDEX IF NOT EXISTS cio_queue_waiting ON cio_queue (workspace, person, seq)
    WHERE last_error IS NOT NULL;
CREATE INDEX IF NOT EXISTS cio_queue_waiting_due ON cio_queue (workspace, due_at)
    WHERE last_error IS NOT NULL;
-- Each person's lane (see rows.lane_of: the same formula): the sender keeps at most one
-- request in flight per lane, reading one lane's calls through this index.
ALTER TABLE cio_queue ADD COLUMN IF NOT EXISTS lane smallint GENERATED ALWAYS AS (
    CASE WHEN person IS NULL THEN 0
         ELSE (ascii(right(person, 1)) * 31 + ascii(left(right(person, 2), 1)) * 7
               + length(person)) % 8 END) STORED;
CREATE INDEX IF NOT EXISTS cio_queue_lane ON cio_queue (workspace, lane, seq);
-- A merge's primary (its person is the secondary; see events.Event.people), from the
-- text: a merge goes once the primary's earlier calls left the queue, and the calls of
-- either person after a merge wait for it.
ALTER TABLE cio_queue ADD COLUMN IF NOT EXISTS other_person text GENERATED ALWAYS AS (
    CASE WHEN left(body, 3) = '[3,' AND strpos(body, '\u0000') = 0
              AND (body::json ->> 7) = 'merge'
         THEN 'c:' || (body::json -> 8 ->> 'primary') END) STORED;
CREATE INDEX IF NOT EXISTS cio_queue_other ON cio_queue (workspace, other_person, seq)
    WHERE other_person IS NOT NULL;
CREATE INDEX IF NOT EXISTS cio_queue_merges ON cio_queue (workspace, person, seq)
    WHERE other_person IS NOT NULL;
-- The calls of a dead letter's person delivered after it (what a replay would land
-- behind), noted by the sender beside the entry, which is written once.
CREATE TABLE IF NOT EXISTS cio_dead_letter_later (
    workspace text NOT NULL,
    id text NOT NULL,
    later text NOT NULL,
    PRIMARY KEY (workspace, id)
);
