-- cio_logging schema version 3: the sender reads a batch per query (see next_batch in
-- postgres.py). A row that failed waits for its retry, and its person's later calls wait
-- for it: those rows alone are indexed by person and by due time, so the check costs an
-- index probe that is usually empty.
CREATE INDEX IF NOT EXISTS cio_queue_waiting ON cio_queue (workspace, person, seq)
    WHERE last_error IS NOT NULL;
CREATE INDEX IF NOT EXISTS cio_queue_waiting_due ON cio_queue (workspace, due_at)
    WHERE last_error IS NOT NULL;
