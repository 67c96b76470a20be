-- Messages an idempotent consumer processed (busbar_outbox::PgIdempotencyStore): one row per
-- <group>/<topic>/<id>, kept until expires_at.
CREATE TABLE IF NOT EXISTS busbar_processed (
    key        text        PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS busbar_processed_expires_at ON busbar_processed (expires_at);
