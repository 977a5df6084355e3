-- +goose Up
-- The event outbox (sql/00008_delivery_events.sql) at less PostgreSQL CPU per delivery; every
-- event, its fields and its order are as before.
--
-- mail.event_time is declared STABLE, as its body is (to_char). PostgreSQL never inlines an SQL
-- function declared stricter than its body: declared IMMUTABLE, it ran as a function of its own
-- (its body parsed and planned once per calling statement, then executed per row: per event in
-- the publisher's read, per accepted delivery in intake's trigger). Inlined, the text is the same.
ALTER FUNCTION mail.event_time(timestamptz) STABLE;

-- accepted: as before, its fields built with jsonb_object from alternating keys and values (all
-- text), which does not look up the type of each value for every row as jsonb_build_object does.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION mail.delivery_events_accepted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO mail.delivery_events (event, delivery_id, fields)
    SELECT 'accepted', n.delivery_id,
           jsonb_strip_nulls(jsonb_object(ARRAY[
               'delivery_id', n.delivery_id,
               'source', n.source,
               'idempotency_key', n.idempotency_key,
               'status', n.status,
               'attempt_no', n.attempt_count::text,
               'reason', n.status_reason,
               'traceparent', n.traceparent,
               'next_attempt_at', mail.event_time(n.next_attempt_at),
               'stream_entry_id', n.stream_entry_id]))
    FROM new_rows n;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- Status transitions, the same events as before (see 00008), at less cost per statement:
-- * A statement whose rows are all `sending` now (the claim, most of the updates of a busy
--   engine) cannot make an event: the function returns before the join.
-- * The attempt just recorded (by the same statement, as in finish_attempts, or an earlier one)
--   is looked up by primary key for each changed row. PL/pgSQL keeps the plan of each statement
--   of a function for the life of the session, made with the statistics of the moment: a plan
--   made while mail.attempts was small (a new database, an empty table just vacuumed) hashed a
--   sequential scan of the whole table for every statement after the table had grown (about
--   1 ms per outcome statement at 20,000 attempts, growing with the table). A LATERAL subquery
--   with a LIMIT is never flattened into a join, and enable_seqscan = off, for this function's
--   own statements only, leaves the planner the primary key however small the table looked
--   (new_rows and old_rows are tuplestore scans, which the setting does not touch).
-- * The fields are built with jsonb_object, as in accepted above.
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION mail.delivery_events_changed() RETURNS trigger
LANGUAGE plpgsql SET enable_seqscan = off AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE status <> 'sending') THEN
        RETURN NULL;
    END IF;
    INSERT INTO mail.delivery_events (event, delivery_id, fields)
    SELECT c.event, n.delivery_id,
           jsonb_strip_nulls(jsonb_object(ARRAY[
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
                                  THEN mail.delivery_event_recipients(n)::text END]))
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
    LEFT JOIN LATERAL (
        SELECT a.status, a.provider_summary
        FROM mail.attempts a
        WHERE n.attempt_count > o.attempt_count
          AND a.delivery_id = n.delivery_id AND a.attempt_no = n.attempt_count
        LIMIT 1
    ) a ON true
    WHERE c.event IS NOT NULL;
    RETURN NULL;
END
$$;
-- +goose StatementEnd

-- +goose Down
-- +goose StatementBegin
CREATE OR REPLACE FUNCTION mail.delivery_events_changed() RETURNS trigger
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

-- +goose StatementBegin
CREATE OR REPLACE FUNCTION mail.delivery_events_accepted() RETURNS trigger
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

ALTER FUNCTION mail.event_time(timestamptz) IMMUTABLE;
