-- The busbar outbox: one row per event, written in the application's transaction.
CREATE TABLE IF NOT EXISTS busbar_outbox (
    seq           BIGSERIAL PRIMARY KEY,
    topic         TEXT        NOT NULL,
    message_id    TEXT        NOT NULL,
    partition_key TEXT,
    payload       BYTEA       NOT NULL,
    headers       JSONB       NOT NULL DEFAULT '[]',
    event_type    TEXT,
    source        TEXT,
    event_time    TIMESTAMPTZ NOT NULL,
    content_type  TEXT,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts      INTEGER     NOT NULL DEFAULT 0,
    available_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error    TEXT,
    parked_at     TIMESTAMPTZ,
    published_at  TIMESTAMPTZ
);
-- What the relay scans: unpublished rows in insert order ...
CREATE INDEX IF NOT EXISTS busbar_outbox_pending ON busbar_outbox (seq) WHERE published_at IS NULL;
-- ... and, per key, the oldest unpublished row.
CREATE INDEX IF NOT EXISTS busbar_outbox_pending_key ON busbar_outbox (partition_key, seq) WHERE published_at IS NULL;
-- Retention clean-up of published rows.
CREATE INDEX IF NOT EXISTS busbar_outbox_published ON busbar_outbox (published_at) WHERE published_at IS NOT NULL;
