-- +goose Up
-- The transactional outbox of delivery events. Triggers on mail.deliveries and
-- mail.malformed_commands write one row per change a producer cares about, in the same
-- transaction as the change itself, whichever statement made it: nothing is published that was
-- not committed, and nothing committed goes unpublished. The event publisher (one instance at a
-- time) reads the unpublished rows in `seq` order, XADDs them to MAIL_REDIS_EVENT_STREAM and
-- marks them published; the retention worker deletes published rows later.
--
-- Order: the events of one delivery are written by transactions that each hold the delivery's
-- row lock, so a later event of a delivery both gets a higher `seq` and commits later; the
-- publisher reads committed unpublished rows in `seq` order, so it never sees a delivery's later
-- event before an earlier one. (This needs the identity's sequence without a per-session cache,
-- its default: with CACHE n, sessions would draw from ranges of their own.)
CREATE TABLE mail.delivery_events (
    seq           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- stable across re-publishes: consumers dedupe on it
    event_id      uuid        NOT NULL DEFAULT gen_random_uuid(),
    event         text        NOT NULL CHECK (event IN ('accepted', 'deferred', 'sent', 'suppressed',
                                  'failed', 'dead_letter', 'cancelled', 'retried', 'rejected')),
    delivery_id   text,
    -- the event's own fields, every value a string (the stream entry minus event_id, event and
    -- occurred_at, which come from the columns)
    fields        jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
-- The publisher's queue: unpublished rows in order, whatever the number of published ones.
CREATE INDEX delivery_events_unpublished_idx ON mail.delivery_events (seq) WHERE published_at IS NULL;
-- Retention of published rows, oldest first.
CREATE INDEX delivery_events_published_at_idx ON mail.delivery_events (published_at)
    WHERE published_at IS NOT NULL;
ALTER TABLE mail.delivery_events SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_analyze_threshold = 1000
);

-- RFC 3339 UTC with milliseconds, as the API writes times.
-- +goose StatementBegin
CREATE FUNCTION mail.event_time(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;
-- +goose StatementEnd

-- accepted: intake created the delivery.
-- +goose StatementBegin
CREATE FUNCTION mail.delivery_events_accepted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mail.delivery_events (event, delivery_id, fields)
    SELECT 'accepted', n.delivery_id,
           jsonb_strip_nulls(jsonb_build_object(
               'delivery_id', n.delivery_id,
               'source', n.source,
               'idempotency_key', n.idempotency_key,
               'status', n.status,
               'attempt_no', n.attempt_count::text,
               'reason', n.status_reason,
               'traceparent', n.traceparent,
               'next_attempt_at', mail.event_time(n.next_attempt_at),
               'stream_entry_id', n.stream_entry_id))
    FROM new_rows n;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- Final and deferred events carry the delivery's per-recipient results when it has them: the
-- `recipient_outcomes` column of deliveries (each envelope recipient's email, status, last reply
-- and attempt; NULL when one recipient was accepted at once). Read through this function, made
-- here to read the column directly when it exists, and otherwise through to_jsonb (a whole-row
-- conversion per final event, which still finds the column should it be added later).
-- +goose StatementBegin
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_attribute
               WHERE attrelid = 'mail.deliveries'::regclass AND attname = 'recipient_outcomes'
                 AND NOT attisdropped) THEN
        EXECUTE 'CREATE FUNCTION mail.delivery_event_recipients(d mail.deliveries) RETURNS jsonb '
                'LANGUAGE sql STABLE AS $f$ SELECT d.recipient_outcomes $f$';
    ELSE
        EXECUTE 'CREATE FUNCTION mail.delivery_event_recipients(d mail.deliveries) RETURNS jsonb '
                'LANGUAGE sql STABLE AS $f$ SELECT to_jsonb(d) -> ''recipient_outcomes'' $f$';
    END IF;
END
$$;
-- +goose StatementEnd

-- Status transitions. Which change is which event:
--   -> sent, suppressed, failed, dead_letter, cancelled          that event (the final one)
--   sending -> queued/rendered after an attempt (attempt_count grew)   deferred: a retryable
--       failure, or an interrupted attempt (lease rescue, shutdown put-back: outcome unknown),
--       with attempt_status telling which, next_attempt_at and the reply
--   sending -> queued/rendered without an attempt (a released claim)   no event
--   a finished status -> queued/rendered (operator retry)       retried
--   the claim (-> sending) and anything else                     no event
-- +goose StatementBegin
CREATE FUNCTION mail.delivery_events_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mail.delivery_events (event, delivery_id, fields)
    SELECT c.event, n.delivery_id,
           jsonb_strip_nulls(jsonb_build_object(
               'delivery_id', n.delivery_id,
               'source', n.source,
               'idempotency_key', n.idempotency_key,
               'status', n.status,
               'attempt_no', n.attempt_count::text,
               'reason', coalesce(n.status_reason, a.provider_summary),
               'traceparent', n.traceparent,
               'attempt_status', a.status,
               'reply', CASE WHEN c.event = 'deferred' THEN a.provider_summary END,
               'next_attempt_at', CASE WHEN c.event IN ('deferred', 'retried')
                                       THEN mail.event_time(n.next_attempt_at) END,
               'previous_status', CASE WHEN c.event = 'retried' THEN o.status END,
               'recipients', CASE WHEN c.event IN ('deferred', 'sent', 'suppressed', 'failed', 'dead_letter')
                                  THEN mail.delivery_event_recipients(n)::text END))
    FROM new_rows n
    JOIN old_rows o ON o.delivery_id = n.delivery_id
    CROSS JOIN LATERAL (
        SELECT CASE
            WHEN n.status = o.status THEN NULL
            WHEN n.status IN ('sent', 'suppressed', 'failed', 'dead_letter', 'cancelled') THEN n.status
            WHEN n.status IN ('queued', 'rendered') AND o.status = 'sending'
                 AND n.attempt_count > o.attempt_count THEN 'deferred'
            WHEN n.status IN ('queued', 'rendered')
                 AND o.status IN ('sent', 'suppressed', 'failed', 'dead_letter', 'cancelled') THEN 'retried'
        END AS event
    ) c
    LEFT JOIN mail.attempts a
           ON n.attempt_count > o.attempt_count
          AND a.delivery_id = n.delivery_id AND a.attempt_no = n.attempt_count
    WHERE c.event IS NOT NULL;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- rejected: a quarantined command, with whatever could be read of it.
-- +goose StatementBegin
CREATE FUNCTION mail.delivery_events_rejected() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mail.delivery_events (event, delivery_id, fields)
    SELECT 'rejected', n.delivery_id,
           jsonb_strip_nulls(jsonb_build_object(
               'delivery_id', n.delivery_id,
               'source', n.source,
               'idempotency_key', left(n.fields ->> 'idempotency_key', 200),
               'reason', n.failure_detail,
               'failure_code', n.failure_code,
               'failure_detail', n.failure_detail,
               'traceparent', left(n.fields ->> 'traceparent', 256),
               'stream_entry_id', n.stream_entry_id))
    FROM new_rows n;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

CREATE TRIGGER delivery_events_accepted
    AFTER INSERT ON mail.deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mail.delivery_events_accepted();
CREATE TRIGGER delivery_events_changed
    AFTER UPDATE ON mail.deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mail.delivery_events_changed();
CREATE TRIGGER delivery_events_rejected
    AFTER INSERT ON mail.malformed_commands
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION mail.delivery_events_rejected();

-- +goose Down
DROP TRIGGER delivery_events_rejected ON mail.malformed_commands;
DROP TRIGGER delivery_events_changed ON mail.deliveries;
DROP TRIGGER delivery_events_accepted ON mail.deliveries;
DROP FUNCTION mail.delivery_events_rejected();
DROP FUNCTION mail.delivery_events_changed();
DROP FUNCTION mail.delivery_events_accepted();
DROP FUNCTION mail.delivery_event_recipients(mail.deliveries);
DROP FUNCTION mail.event_time(timestamptz);
DROP TABLE mail.delivery_events;
