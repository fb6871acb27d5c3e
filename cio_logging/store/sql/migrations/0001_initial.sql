-- cio_logging schema version 1: the queue, the dead letters, the sender's lease and state.
-- Every statement is idempotent (IF NOT EXISTS): applying it again changes nothing, and
-- no migration ever drops a table or a column that holds rows.

-- Events waiting for Customer.io. ``body`` is the row text the local store keeps too
-- (see cio_logging/store/rows.py); the other columns are for indexes and for people.
CREATE TABLE IF NOT EXISTS cio_queue (
    workspace text NOT NULL,
    id text NOT NULL,
    seq bigserial NOT NULL,
    event text NOT NULL,
    due_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    first_failure_at double precision,
    last_error text,
    logged_at double precision NOT NULL,
    body text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, id)
);
CREATE INDEX IF NOT EXISTS cio_queue_due ON cio_queue (workspace, due_at, seq);
CREATE INDEX IF NOT EXISTS cio_queue_seq ON cio_queue (workspace, seq);

-- Events that failed for good. ``entry`` is the whole record (history, replays); the
-- other columns are there to be read with psql.
CREATE TABLE IF NOT EXISTS cio_dead_letter (
    workspace text NOT NULL,
    id text NOT NULL,
    event text,
    customer_id text,
    anonymous_id text,
    data jsonb,
    error text NOT NULL,
    error_type text NOT NULL,
    status integer,
    attempts integer NOT NULL,
    last_failure_at double precision NOT NULL,
    entry jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, id)
);
CREATE INDEX IF NOT EXISTS cio_dead_letter_event ON cio_dead_letter (workspace, event);

-- The one sender of a workspace: a lease with an expiry, renewed by its holder. The
-- term grows at every change of holder and fences the holder's writes.
CREATE TABLE IF NOT EXISTS cio_lease (
    workspace text PRIMARY KEY,
    term bigint NOT NULL,
    holder text NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    since timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

-- What the sender knows (breaker, pauses, last error, counters), for status anywhere.
CREATE TABLE IF NOT EXISTS cio_sender_state (
    workspace text PRIMARY KEY,
    term bigint NOT NULL,
    state jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
