-- The command consumer (CONTRACT §4): one transaction per stream batch, multi-row statements.
-- A batch travels as one JSON parameter, an array of row arrays (%(rows)s, read with
-- jsonb_array_elements and ->/->> by position): one C-speed encode on each side, where psycopg's
-- per-column arrays cost far more in Python than the statement itself. Payloads and recipients
-- arrive as JSON values inside it, parsed once. Rows are handled in key order so that two
-- consumers committing overlapping batches take their row locks in the same order.

-- name: intake_accept
-- One round of well-formed commands in one statement: take each command's idempotency
-- reservation (or take over one that has expired), then insert the queued delivery and its
-- payload of each command whose reservation was taken. Returns only the commands that were not
-- accepted (1-based positions in %(rows)s; a row at position 0 says the scheduler was woken, see
-- `wake`), with whether their reservation was taken: not taken =
-- a live reservation blocks it (a duplicate or a conflict); taken = its delivery_id exists (the
-- caller looks at both and gives back reservations taken for conflicts).
--
-- Reservations: a live one (committed by another command, or by a concurrent transaction we
-- waited for) stays untouched. A reservation lasts until max(now, send_at) +
-- MAIL_IDEMPOTENCY_TTL, and one whose delivery is not final yet is never taken over, whatever its
-- expiry. Deliveries: a delivery_id that already exists is skipped; payloads are stored only for
-- the deliveries inserted here. next_attempt_at = schedule_entered_at = max(now, send_at).
-- Reservations are all taken (in key order) before any delivery is inserted (in id order: the
-- insert reads the sorted join with the reservations taken).
WITH c AS (
    SELECT e.n AS n, e.value ->> 0 AS delivery_id, e.value ->> 1 AS source, e.value ->> 2 AS idempotency_key,
           e.value ->> 3 AS fingerprint, e.value ->> 4 AS payload_mode, e.value ->> 5 AS template_id,
           e.value ->> 6 AS locale, e.value -> 7 AS recipients, (e.value ->> 8)::timestamptz AS send_at,
           e.value ->> 9 AS message_id, e.value ->> 10 AS traceparent, e.value ->> 11 AS stream_entry_id,
           e.value -> 12 AS payload
    FROM jsonb_array_elements(%(rows)s::jsonb) WITH ORDINALITY AS e(value, n)
), r AS (
    INSERT INTO mail.idempotency_reservations AS r
        (source, idempotency_key, delivery_id, fingerprint, created_at, expires_at)
    SELECT c.source, c.idempotency_key, c.delivery_id, c.fingerprint, now(),
           greatest(now(), c.send_at) + %(ttl)s::interval
    FROM c
    ORDER BY c.source, c.idempotency_key
    ON CONFLICT (source, idempotency_key) DO UPDATE
    SET delivery_id = excluded.delivery_id,
        fingerprint = excluded.fingerprint,
        created_at = excluded.created_at,
        expires_at = excluded.expires_at
    WHERE r.expires_at <= now()
      AND NOT EXISTS (SELECT 1 FROM mail.deliveries x
                      WHERE x.delivery_id = r.delivery_id AND x.status IN ('queued', 'rendered', 'sending'))
    RETURNING r.source, r.idempotency_key
), d AS (
    INSERT INTO mail.deliveries
        (delivery_id, source, idempotency_key, status, payload_mode, template_id, locale, recipients,
         recipient_emails, send_at, next_attempt_at, schedule_entered_at, message_id, traceparent,
         stream_entry_id)
    SELECT c.delivery_id, c.source, c.idempotency_key, 'queued', c.payload_mode, c.template_id, c.locale,
           c.recipients,
           ARRAY(SELECT lower(e ->> 'email')
                 FROM jsonb_array_elements((c.recipients -> 'to') || (c.recipients -> 'cc')
                                           || (c.recipients -> 'bcc')) AS e),
           c.send_at, greatest(now(), c.send_at), greatest(now(), c.send_at), c.message_id, c.traceparent,
           c.stream_entry_id
    FROM c JOIN r ON r.source = c.source AND r.idempotency_key = c.idempotency_key
    ORDER BY c.delivery_id
    ON CONFLICT (delivery_id) DO NOTHING
    RETURNING delivery_id
), p AS (
    INSERT INTO mail.payloads (delivery_id, payload)
    SELECT c.delivery_id, c.payload FROM c JOIN d ON d.delivery_id = c.delivery_id
), wake AS (
    -- Wake the scheduler (it LISTENs on mail_schedule; the notification is delivered at commit,
    -- and dropped with a transaction that rolls back) when a delivery inserted here is due now or
    -- within %(notify_within)s; later ones it finds through its next-due wait. Part of this
    -- statement, not one of its own: one round trip less per intake batch.
    SELECT pg_notify('mail_schedule', '')
    FROM (SELECT 1 FROM c JOIN d ON d.delivery_id = c.delivery_id
          WHERE c.send_at IS NULL OR c.send_at <= now() + %(notify_within)s::interval
          LIMIT 1) AS due
)
SELECT c.n AS n, r.source IS NOT NULL AS reserved
FROM c
LEFT JOIN r ON r.source = c.source AND r.idempotency_key = c.idempotency_key
LEFT JOIN d ON d.delivery_id = c.delivery_id
WHERE d.delivery_id IS NULL
UNION ALL
-- position 0: the scheduler was notified
SELECT 0, true FROM wake
ORDER BY n;

-- name: intake_reservations_get
-- The live reservations of the keys this batch could not take, each read through the primary
-- key. (As a plain join, a prepared plan that estimates the table small hashes the keys and
-- scans every reservation, a week of commands, for each batch holding a duplicate: the
-- LIMIT keeps the lookup inside the loop over the keys.)
SELECT r.source, r.idempotency_key, r.delivery_id, r.fingerprint
FROM jsonb_array_elements(%(rows)s::jsonb) AS e
CROSS JOIN LATERAL (
    SELECT x.source, x.idempotency_key, x.delivery_id, x.fingerprint
    FROM mail.idempotency_reservations x
    WHERE x.source = e ->> 0 AND x.idempotency_key = e ->> 1
    LIMIT 1
) AS r;

-- name: intake_delivery_owners
-- Who owns the delivery ids this batch could not insert.
SELECT delivery_id, source, idempotency_key, stream_entry_id
FROM mail.deliveries WHERE delivery_id = ANY(%(delivery_ids)s::text[]);

-- name: intake_release_reservations
-- Give back reservations taken in this transaction for commands that turned out to conflict.
DELETE FROM mail.idempotency_reservations r
USING (SELECT e ->> 0 AS source, e ->> 1 AS idempotency_key, e ->> 2 AS delivery_id, e ->> 3 AS fingerprint
       FROM jsonb_array_elements(%(rows)s::jsonb) AS e) AS c
WHERE r.source = c.source AND r.idempotency_key = c.idempotency_key
  AND r.delivery_id = c.delivery_id AND r.fingerprint = c.fingerprint;

-- name: intake_insert_malformed
-- Quarantine rows; a stream entry redelivered after a crash between commit and XACK is recorded
-- once (unique stream_entry_id). Returns the entries recorded now.
INSERT INTO mail.malformed_commands
    (failure_code, failure_detail, stream_entry_id, delivery_id, source, fields)
SELECT m.failure_code, m.failure_detail, m.stream_entry_id, m.delivery_id, m.source, m.fields
FROM (SELECT e ->> 0 AS failure_code, e ->> 1 AS failure_detail, e ->> 2 AS stream_entry_id,
             e ->> 3 AS delivery_id, e ->> 4 AS source, e -> 5 AS fields
      FROM jsonb_array_elements(%(rows)s::jsonb) AS e) AS m
ORDER BY m.stream_entry_id
ON CONFLICT (stream_entry_id) DO NOTHING
RETURNING stream_entry_id;

-- name: intake_prior_outcomes
-- For redelivered entries (read again from a pending list): those whose outcome is already
-- committed, as a quarantine row or as the delivery they created.
-- Each entry is looked up through the unique index of its quarantine row and the primary key
-- of its delivery (the OR keeps both lookups inside the loop over the entries: as joins, a
-- prepared plan that estimates the tables small scans all of them).
SELECT c.stream_entry_id
FROM (SELECT e ->> 0 AS delivery_id, e ->> 1 AS stream_entry_id
      FROM jsonb_array_elements(%(rows)s::jsonb) AS e) AS c
WHERE EXISTS (SELECT 1 FROM mail.malformed_commands m WHERE m.stream_entry_id = c.stream_entry_id)
   OR EXISTS (SELECT 1 FROM mail.deliveries d
              WHERE d.delivery_id = c.delivery_id AND d.stream_entry_id = c.stream_entry_id);

