-- cio_logging schema version 3: what PostgreSQL's types cannot hold, and the spills.
--
-- A dead letter whose event holds a NUL character (valid in JSON, refused by jsonb and
-- text) keeps its exact entry in entry_text; entry then holds a copy with each NUL
-- written as the six characters \u0000, for psql.
ALTER TABLE cio_dead_letter ADD COLUMN IF NOT EXISTS entry_text text;

-- Each host's local spill (rows committed there while the database did not answer),
-- as that host last reported it: status shows the rows still on their way.
CREATE TABLE IF NOT EXISTS cio_spill (
    workspace text NOT NULL,
    host text NOT NULL,
    directory text NOT NULL,
    rows bigint NOT NULL,
    oldest_logged_at double precision,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace, host, directory)
);
