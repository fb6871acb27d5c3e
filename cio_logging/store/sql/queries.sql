-- Every statement of the PostgreSQL store, each under "-- name: NAME", used by name
-- (cio_logging/store/postgres.py). Parameters are psycopg's %(name)s.
--
-- One clock for the fleet: due times, logging times and lease expiries are stored on
-- the database's clock. A time a host computed arrives with %(shift)s, the database's
-- clock minus that host's (measured by Database.clock_shift), and is moved by it; a
-- time read back is moved the other way. So hosts whose clocks disagree by minutes
-- neither delay nor age each other's rows.
--
-- Nothing here leaves state in the session (PgBouncer in transaction mode may hand it
-- to another client next): locks and settings are transaction-scoped.

-- name: schema_version
SELECT coalesce(max(version), 0) FROM cio_schema_version;

-- name: create_schema_version
CREATE TABLE IF NOT EXISTS cio_schema_version (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: lock_schema
-- Transaction-scoped, so it works behind any pooler; two processes starting together
-- apply the migrations once.
SELECT pg_advisory_xact_lock(hashtext('cio_logging schema'));

-- name: record_schema_version
INSERT INTO cio_schema_version (version) VALUES (%(version)s) ON CONFLICT DO NOTHING;

-- name: ping
SELECT 1;

-- name: limit_transaction
-- The server stops this transaction's statements past the client's deadline too;
-- SET LOCAL ends with the transaction, so no pooled session keeps it. A client stopped
-- inside a transaction (SIGSTOP, a VM paused) is cut off past it as well: a sender's
-- fenced write holds the lease row FOR SHARE, which would keep every other process
-- from taking the lease over for as long as it stays stopped.
SELECT set_config('statement_timeout', %(ms)s, true), set_config('lock_timeout', %(ms)s, true),
       set_config('idle_in_transaction_session_timeout', %(ms)s, true);

-- name: clock
-- The database's clock (Database.clock_shift brackets it with this host's).
SELECT extract(epoch FROM clock_timestamp())::float8;

-- name: insert_rows
-- The largest position given (0 when every id was already queued). A row due at once is
-- stored due at time 0 (due since always), so rows due at once are read in commit order
-- (seq), which is also the order the sender keeps for a person: a time taken when
-- concurrent commits start can disagree with the order their rows get positions in,
-- and the sender would then fetch each person's earlier rows one by one.
WITH inserted AS (
    INSERT INTO cio_queue (workspace, id, event, due_at, logged_at, body, person)
    SELECT %(workspace)s, r.id, r.event,
           CASE WHEN r.due_at <= %(host_now)s::float8 THEN 0 ELSE r.due_at + %(shift)s::float8 END,
           r.logged_at + %(shift)s::float8, r.body, r.person
    FROM unnest(%(ids)s::text[], %(events)s::text[], %(due)s::float8[], %(logged)s::float8[],
                %(bodies)s::text[], %(persons)s::text[])
         AS r(id, event, due_at, logged_at, body, person)
    ON CONFLICT (workspace, id) DO NOTHING
    RETURNING seq
)
SELECT coalesce(max(seq), 0) FROM inserted;

-- name: read_due
-- due_at as stored (the cursor of the next read) and on the reader's clock.
SELECT id, due_at, body, seq, due_at - %(shift)s::float8, logged_at - %(shift)s::float8
FROM cio_queue
WHERE workspace = %(workspace)s AND due_at <= %(now)s::float8 + %(shift)s::float8
ORDER BY due_at, seq LIMIT %(limit)s;

-- name: read_due_after
SELECT id, due_at, body, seq, due_at - %(shift)s::float8, logged_at - %(shift)s::float8
FROM cio_queue
WHERE workspace = %(workspace)s AND due_at <= %(now)s::float8 + %(shift)s::float8
  AND (due_at, seq) > (%(due)s, %(seq)s)
ORDER BY due_at, seq LIMIT %(limit)s;

-- The rows of these people up to a position, in commit order: the sender sends a
-- person's call only once every earlier one is accounted for (see worker.py).
-- name: earlier_rows
SELECT person, seq, due_at - %(shift)s::float8, id
FROM cio_queue
WHERE workspace = %(workspace)s AND person = ANY(%(people)s) AND seq <= %(through)s
ORDER BY seq;

-- name: person_counts
SELECT person, count(*) FROM cio_queue
WHERE workspace = %(workspace)s AND person = ANY(%(people)s) AND seq <= %(through)s
GROUP BY person;

-- name: delete_rows
DELETE FROM cio_queue WHERE workspace = %(workspace)s AND id = ANY(%(ids)s);

-- name: record_failure
UPDATE cio_queue AS q
SET due_at = r.due_at + %(shift)s::float8, body = r.body, attempts = r.attempts,
    first_failure_at = r.first_failure_at, last_error = %(error)s
FROM unnest(%(ids)s::text[], %(due)s::float8[], %(bodies)s::text[], %(attempts)s::int[],
            %(first)s::float8[]) AS r(id, due_at, body, attempts, first_failure_at)
WHERE q.workspace = %(workspace)s AND q.id = r.id;

-- name: get_row
SELECT id, due_at - %(shift)s::float8, body, seq, logged_at - %(shift)s::float8
FROM cio_queue
WHERE workspace = %(workspace)s AND id = %(id)s;

-- name: count_rows
SELECT count(*) FROM cio_queue WHERE workspace = %(workspace)s;

-- name: queue_summary
-- How many rows wait, and when the oldest was logged (on the reader's clock).
SELECT count(*), min(logged_at) - %(shift)s::float8
FROM cio_queue
WHERE workspace = %(workspace)s;

-- name: oldest_logged_at
SELECT min(logged_at) - %(shift)s::float8
FROM cio_queue
WHERE workspace = %(workspace)s;

-- name: sendable_through
-- A row at or before a position still waiting that can go now (due, or never tried,
-- or due further ahead than any retry: not of this clock).
SELECT 1 FROM cio_queue
WHERE workspace = %(workspace)s AND seq <= %(seq)s
  AND (due_at <= extract(epoch FROM statement_timestamp())
       OR due_at > extract(epoch FROM statement_timestamp()) + %(horizon)s
       OR last_error IS NULL)
LIMIT 1;

-- name: due_now_if_after
-- Rows due further ahead than any retry the sender schedules were not scheduled on
-- this clock (an earlier version wrote hosts' own clocks): they are due now.
UPDATE cio_queue SET due_at = extract(epoch FROM statement_timestamp())
WHERE workspace = %(workspace)s
  AND due_at > extract(epoch FROM statement_timestamp()) + %(horizon)s;

-- name: lease_for_share
-- Held until the transaction ends: a takeover (an UPDATE of this row) waits for the
-- holder's acknowledgement to commit, and after it no stale holder's can.
SELECT term, holder, expires_at > now() FROM cio_lease
WHERE workspace = %(workspace)s FOR SHARE;

-- name: take_lease
INSERT INTO cio_lease AS l (workspace, term, holder, host, pid, since, expires_at)
VALUES (%(workspace)s, 1, %(holder)s, %(host)s, %(pid)s, now(),
        now() + make_interval(secs => %(seconds)s))
ON CONFLICT (workspace) DO UPDATE
SET term = l.term + 1, holder = excluded.holder, host = excluded.host, pid = excluded.pid,
    since = now(), expires_at = excluded.expires_at
WHERE l.expires_at <= now()
RETURNING term;

-- name: renew_lease
UPDATE cio_lease SET expires_at = now() + make_interval(secs => %(seconds)s)
WHERE workspace = %(workspace)s AND holder = %(holder)s AND term = %(term)s
  AND expires_at > now()
RETURNING term;

-- name: release_lease
UPDATE cio_lease SET expires_at = now()
WHERE workspace = %(workspace)s AND holder = %(holder)s AND term = %(term)s;

-- name: read_lease
-- Times on the reader's clock.
SELECT term, host, pid,
       extract(epoch FROM since)::float8 - %(shift)s::float8,
       extract(epoch FROM expires_at)::float8 - %(shift)s::float8,
       expires_at > now()
FROM cio_lease
WHERE workspace = %(workspace)s;

-- name: write_sender_state
-- Fenced: written only while the writer's term is the lease's (a sender paused past
-- its lease writes nothing once another took over). The state's times are on the
-- writer's clock; clock_offset (database minus writer) lets a reader move them.
INSERT INTO cio_sender_state AS s (workspace, term, state, updated_at)
SELECT %(workspace)s, %(term)s,
       %(state)s::jsonb || jsonb_build_object('clock_offset', %(shift)s::float8),
       now()
FROM cio_lease AS l
WHERE l.workspace = %(workspace)s AND l.term = %(term)s AND l.holder = %(holder)s
FOR SHARE OF l
ON CONFLICT (workspace) DO UPDATE
SET term = excluded.term, state = excluded.state, updated_at = excluded.updated_at
WHERE s.term <= excluded.term
RETURNING 1;

-- name: read_sender_state
-- The state, and when it was written (on the reader's clock).
SELECT state, extract(epoch FROM updated_at)::float8 - %(shift)s::float8
FROM cio_sender_state
WHERE workspace = %(workspace)s;

-- name: add_dead_letter
INSERT INTO cio_dead_letter AS d (workspace, id, event, customer_id, anonymous_id, data, error,
                                  error_type, status, attempts, last_failure_at, entry,
                                  entry_text)
VALUES (%(workspace)s, %(id)s, %(event)s, %(customer_id)s, %(anonymous_id)s, %(data)s,
        %(error)s, %(error_type)s, %(status)s, %(attempts)s, %(last_failure_at)s, %(entry)s,
        %(entry_text)s)
ON CONFLICT (workspace, id) DO UPDATE
SET event = excluded.event, customer_id = excluded.customer_id,
    anonymous_id = excluded.anonymous_id, data = excluded.data, error = excluded.error,
    error_type = excluded.error_type, status = excluded.status, attempts = excluded.attempts,
    last_failure_at = excluded.last_failure_at, entry = excluded.entry,
    entry_text = excluded.entry_text;

-- name: get_dead_letter
-- entry_text holds the exact entry when jsonb could not (a NUL character); the calls of
-- its person delivered after it are noted beside it (cio_dead_letter_later).
SELECT coalesce(d.entry_text, d.entry::text), l.later FROM cio_dead_letter AS d
LEFT JOIN cio_dead_letter_later AS l ON l.workspace = d.workspace AND l.id = d.id
WHERE d.workspace = %(workspace)s AND d.id = %(id)s;

-- name: all_dead_letters
SELECT d.id, coalesce(d.entry_text, d.entry::text), l.later FROM cio_dead_letter AS d
LEFT JOIN cio_dead_letter_later AS l ON l.workspace = d.workspace AND l.id = d.id
WHERE d.workspace = %(workspace)s ORDER BY d.id;

-- name: delete_dead_letters
DELETE FROM cio_dead_letter WHERE workspace = %(workspace)s AND id = ANY(%(ids)s);

-- name: delete_later_calls
DELETE FROM cio_dead_letter_later WHERE workspace = %(workspace)s AND id = ANY(%(ids)s);

-- name: count_dead_letters
SELECT count(*) FROM cio_dead_letter WHERE workspace = %(workspace)s;

-- name: count_dead_letters_by_event
SELECT coalesce(event, '<unreadable>'), count(*) FROM cio_dead_letter
WHERE workspace = %(workspace)s GROUP BY 1;

-- name: count_dead_letters_by_reason
SELECT error_type, count(*) FROM cio_dead_letter WHERE workspace = %(workspace)s GROUP BY 1;

-- name: report_spill
-- What a host's local spill holds (0 once moved), for status on any host.
INSERT INTO cio_spill AS s (workspace, host, directory, rows, oldest_logged_at, updated_at)
VALUES (%(workspace)s, %(host)s, %(directory)s, %(rows)s,
        %(oldest)s::float8 + %(shift)s::float8,
        now())
ON CONFLICT (workspace, host, directory) DO UPDATE
SET rows = excluded.rows, oldest_logged_at = excluded.oldest_logged_at,
    updated_at = excluded.updated_at;

-- name: spills
-- Every host's spill that held rows when last reported; times on the reader's clock.
SELECT host, directory, rows, oldest_logged_at - %(shift)s::float8,
       extract(epoch FROM updated_at)::float8 - %(shift)s::float8
FROM cio_spill
WHERE workspace = %(workspace)s AND rows > 0
ORDER BY host, directory;

-- The sender's statements, one per batch (see PostgresLog.next_batch for the read, built
-- in Python from the API's templates). Times cross on the host's clock, moved by shift.
-- name: rows_at
SELECT id, due_at - %(shift)s::float8, body, seq, attempts, first_failure_at, last_error,
       logged_at - %(shift)s::float8
FROM cio_queue
WHERE workspace = %(workspace)s AND seq = ANY(%(seqs)s) ORDER BY seq;

-- name: delete_seqs
DELETE FROM cio_queue WHERE workspace = %(workspace)s AND seq = ANY(%(seqs)s::bigint[]);

-- name: exhausted_rows
SELECT id, due_at - %(shift)s::float8, body, seq, attempts, first_failure_at, last_error,
       logged_at - %(shift)s::float8
FROM cio_queue
WHERE workspace = %(workspace)s AND seq = ANY(%(seqs)s::bigint[])
  AND attempts + 1 >= %(max_attempts)s
ORDER BY seq;

-- Each row waits the delay of its attempt count (the sender's policy, as an array).
-- name: schedule_retries
UPDATE cio_queue
SET attempts = attempts + %(counted)s,
    first_failure_at = coalesce(first_failure_at, %(now)s),
    last_error = %(error)s,
    due_at = %(now)s::float8 + %(shift)s::float8 + (%(delays)s::float8[])[
        least(attempts + %(counted)s, cardinality(%(delays)s::float8[]) - 1) + 1]
WHERE workspace = %(workspace)s AND seq = ANY(%(seqs)s::bigint[])
  AND attempts + %(counted)s < %(max_attempts)s;

-- name: next_due
SELECT min(due_at) - %(shift)s::float8 FROM cio_queue
WHERE workspace = %(workspace)s AND last_error IS NOT NULL
  AND due_at > %(after)s::float8 + %(shift)s::float8;

-- Replayed rows go ahead of every queued row of the workspace, in the order given.
-- name: requeue_rows
INSERT INTO cio_queue (workspace, id, seq, event, due_at, logged_at, body, person, attempts)
SELECT %(workspace)s, r.id,
       least(coalesce((SELECT min(seq) FROM cio_queue WHERE workspace = %(workspace)s), 1), 1)
         - cardinality(%(ids)s::text[]) - 1 + r.n,
       r.event, r.due_at + %(shift)s::float8, r.logged_at + %(shift)s::float8, r.body,
       r.person, r.attempts
FROM unnest(%(ids)s::text[], %(events)s::text[], %(due)s::float8[], %(logged)s::float8[],
            %(bodies)s::text[], %(persons)s::text[], %(attempts)s::int[])
     WITH ORDINALITY AS r(id, event, due_at, logged_at, body, person, attempts, n)
ON CONFLICT (workspace, id) DO NOTHING
RETURNING seq;

-- name: count_person
SELECT count(*) FROM cio_queue WHERE workspace = %(workspace)s AND person = %(person)s;

-- name: set_later_calls
INSERT INTO cio_dead_letter_later (workspace, id, later)
VALUES (%(workspace)s, %(id)s, %(later)s)
ON CONFLICT (workspace, id) DO UPDATE SET later = excluded.later;

-- name: ids_queued
SELECT id FROM cio_queue WHERE workspace = %(workspace)s AND id = ANY(%(ids)s);
