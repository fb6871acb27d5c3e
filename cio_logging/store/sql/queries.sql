-- Every statement of the PostgreSQL store, each under "-- name: NAME", used by name
-- (cio_logging/store/postgres.py). Parameters are psycopg's %(name)s.

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

-- name: insert_rows
INSERT INTO cio_queue (workspace, id, event, due_at, logged_at, body, person)
SELECT %(workspace)s, r.id, r.event, r.due_at, r.logged_at, r.body, r.person
FROM unnest(%(ids)s::text[], %(events)s::text[], %(due)s::float8[], %(logged)s::float8[],
            %(bodies)s::text[], %(persons)s::text[])
     AS r(id, event, due_at, logged_at, body, person)
ON CONFLICT (workspace, id) DO NOTHING
RETURNING seq;

-- name: read_due
SELECT id, due_at, body, seq FROM cio_queue
WHERE workspace = %(workspace)s AND due_at <= %(now)s
ORDER BY due_at, seq LIMIT %(limit)s;

-- name: read_due_after
SELECT id, due_at, body, seq FROM cio_queue
WHERE workspace = %(workspace)s AND due_at <= %(now)s AND (due_at, seq) > (%(due)s, %(seq)s)
ORDER BY due_at, seq LIMIT %(limit)s;

-- The rows of these people up to a position, in commit order: the sender sends a
-- person's call only once every earlier one is accounted for (see worker.py).
-- name: earlier_rows
SELECT person, seq, due_at, id FROM cio_queue
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
SET due_at = r.due_at, body = r.body, attempts = r.attempts,
    first_failure_at = r.first_failure_at, last_error = %(error)s
FROM unnest(%(ids)s::text[], %(due)s::float8[], %(bodies)s::text[], %(attempts)s::int[],
            %(first)s::float8[]) AS r(id, due_at, body, attempts, first_failure_at)
WHERE q.workspace = %(workspace)s AND q.id = r.id;

-- name: get_row
SELECT id, due_at, body, seq FROM cio_queue WHERE workspace = %(workspace)s AND id = %(id)s;

-- name: count_rows
SELECT count(*) FROM cio_queue WHERE workspace = %(workspace)s;

-- name: queue_summary
SELECT count(*), min(logged_at) FROM cio_queue WHERE workspace = %(workspace)s;

-- name: oldest_logged_at
SELECT min(logged_at) FROM cio_queue WHERE workspace = %(workspace)s;

-- name: sendable_through
SELECT 1 FROM cio_queue
WHERE workspace = %(workspace)s AND seq <= %(seq)s
  AND (due_at <= %(now)s OR due_at > %(horizon)s OR last_error IS NULL)
LIMIT 1;

-- name: shift_later_due
UPDATE cio_queue SET due_at = due_at + %(step)s WHERE workspace = %(workspace)s AND due_at > %(now)s;

-- name: shift_waiting_retries
UPDATE cio_queue SET due_at = due_at + %(step)s
WHERE workspace = %(workspace)s AND due_at > %(low)s AND due_at <= %(high)s
  AND last_error IS NOT NULL;

-- name: due_now_if_after
UPDATE cio_queue SET due_at = %(now)s WHERE workspace = %(workspace)s AND due_at > %(horizon)s;

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
SELECT term, host, pid, extract(epoch FROM since), extract(epoch FROM expires_at),
       expires_at > now()
FROM cio_lease WHERE workspace = %(workspace)s;

-- name: write_sender_state
INSERT INTO cio_sender_state AS s (workspace, term, state, updated_at)
VALUES (%(workspace)s, %(term)s, %(state)s, now())
ON CONFLICT (workspace) DO UPDATE
SET term = excluded.term, state = excluded.state, updated_at = now()
WHERE s.term <= excluded.term;

-- name: read_sender_state
SELECT state, extract(epoch FROM updated_at) FROM cio_sender_state
WHERE workspace = %(workspace)s;

-- name: add_dead_letter
INSERT INTO cio_dead_letter AS d (workspace, id, event, customer_id, anonymous_id, data, error,
                                  error_type, status, attempts, last_failure_at, entry)
VALUES (%(workspace)s, %(id)s, %(event)s, %(customer_id)s, %(anonymous_id)s, %(data)s,
        %(error)s, %(error_type)s, %(status)s, %(attempts)s, %(last_failure_at)s, %(entry)s)
ON CONFLICT (workspace, id) DO UPDATE
SET event = excluded.event, customer_id = excluded.customer_id,
    anonymous_id = excluded.anonymous_id, data = excluded.data, error = excluded.error,
    error_type = excluded.error_type, status = excluded.status, attempts = excluded.attempts,
    last_failure_at = excluded.last_failure_at, entry = excluded.entry;

-- name: get_dead_letter
SELECT entry::text FROM cio_dead_letter WHERE workspace = %(workspace)s AND id = %(id)s;

-- name: all_dead_letters
SELECT id, entry::text FROM cio_dead_letter WHERE workspace = %(workspace)s ORDER BY id;

-- name: delete_dead_letters
DELETE FROM cio_dead_letter WHERE workspace = %(workspace)s AND id = ANY(%(ids)s);

-- name: count_dead_letters
SELECT count(*) FROM cio_dead_letter WHERE workspace = %(workspace)s;

-- name: count_dead_letters_by_event
SELECT coalesce(event, '<unreadable>'), count(*) FROM cio_dead_letter
WHERE workspace = %(workspace)s GROUP BY 1;

-- name: count_dead_letters_by_reason
SELECT error_type, count(*) FROM cio_dead_letter WHERE workspace = %(workspace)s GROUP BY 1;

-- The sender's statements, one per batch (see PostgresLog.next_batch for the read).
-- name: rows_at
SELECT id, due_at, body, seq, attempts, first_failure_at, last_error FROM cio_queue
WHERE workspace = %(workspace)s AND seq = ANY(%(seqs)s) ORDER BY seq;

-- name: delete_seqs
DELETE FROM cio_queue WHERE workspace = %(workspace)s AND seq = ANY(%(seqs)s::bigint[]);

-- name: exhausted_rows
SELECT id, due_at, body, seq, attempts, first_failure_at, last_error FROM cio_queue
WHERE workspace = %(workspace)s AND seq = ANY(%(seqs)s::bigint[])
  AND attempts + 1 >= %(max_attempts)s
ORDER BY seq;

-- Each row waits the delay of its attempt count (the sender's policy, as an array).
-- name: schedule_retries
UPDATE cio_queue
SET attempts = attempts + %(counted)s,
    first_failure_at = coalesce(first_failure_at, %(now)s),
    last_error = %(error)s,
    due_at = %(now)s + (%(delays)s::float8[])[
        least(attempts + %(counted)s, cardinality(%(delays)s::float8[]) - 1) + 1]
WHERE workspace = %(workspace)s AND seq = ANY(%(seqs)s::bigint[])
  AND attempts + %(counted)s < %(max_attempts)s;

-- name: next_due
SELECT min(due_at) FROM cio_queue
WHERE workspace = %(workspace)s AND last_error IS NOT NULL AND due_at > %(after)s;

-- Replayed rows go ahead of every queued row of the workspace, in the order given.
-- name: requeue_rows
INSERT INTO cio_queue (workspace, id, seq, event, due_at, logged_at, body, person, attempts)
SELECT %(workspace)s, r.id,
       least(coalesce((SELECT min(seq) FROM cio_queue WHERE workspace = %(workspace)s), 1), 1)
         - cardinality(%(ids)s::text[]) - 1 + r.n,
       r.event, r.due_at, r.logged_at, r.body, r.person, r.attempts
FROM unnest(%(ids)s::text[], %(events)s::text[], %(due)s::float8[], %(logged)s::float8[],
            %(bodies)s::text[], %(persons)s::text[], %(attempts)s::int[])
     WITH ORDINALITY AS r(id, event, due_at, logged_at, body, person, attempts, n)
ON CONFLICT (workspace, id) DO NOTHING
RETURNING seq;

-- name: count_person
SELECT count(*) FROM cio_queue WHERE workspace = %(workspace)s AND person = %(person)s;

-- name: set_dead_letter_entry
UPDATE cio_dead_letter SET entry = %(entry)s WHERE workspace = %(workspace)s AND id = %(id)s;

-- name: ids_queued
SELECT id FROM cio_queue WHERE workspace = %(workspace)s AND id = ANY(%(ids)s);
