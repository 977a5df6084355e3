-- Reads and operator verbs of the internal HTTP API (CONTRACT §7).

-- name: delivery_get
SELECT d.*, dl.reason AS dl_reason, dl.created_at AS dl_created_at
FROM mail.deliveries d
LEFT JOIN mail.dead_letters dl ON dl.delivery_id = d.delivery_id
WHERE d.delivery_id = %(delivery_id)s;

-- name: attempts_for_delivery
SELECT attempt_no, status, started_at, finished_at, duration_ms, provider_summary, instance_id
FROM mail.attempts WHERE delivery_id = %(delivery_id)s ORDER BY attempt_no;

-- name: attempts_for_deliveries
-- One round trip for the attempts of a whole listing page.
SELECT delivery_id, attempt_no, status, started_at, finished_at, duration_ms, provider_summary, instance_id
FROM mail.attempts WHERE delivery_id = ANY(%(delivery_ids)s) ORDER BY delivery_id, attempt_no;

-- name: deliveries_list
-- Newest first by the keyset (created_at DESC, delivery_id DESC). The filter conditions below are
-- ANDed into the WHERE clause; each one keeps an index usable: deliveries_created_at_idx,
-- deliveries_status_created_at_idx (status =) or the GIN index on recipient_emails (@>).
SELECT d.*, dl.reason AS dl_reason, dl.created_at AS dl_created_at
FROM mail.deliveries d
LEFT JOIN mail.dead_letters dl ON dl.delivery_id = d.delivery_id
WHERE {filters}
ORDER BY d.created_at DESC, d.delivery_id DESC
LIMIT %(limit)s;

-- name: deliveries_filter_status
d.status = %(status)s;

-- name: deliveries_filter_source
d.source = %(source)s;

-- name: deliveries_filter_recipient
d.recipient_emails @> ARRAY[lower(%(recipient)s)]::text[];

-- name: deliveries_filter_after
(d.created_at, d.delivery_id) < (%(after_created_at)s, %(after_delivery_id)s);

-- name: delivery_content
SELECT d.delivery_id, d.status, d.message_id, p.subject, p.text_body, p.html_body, p.headers, p.rendered_at
FROM mail.deliveries d
LEFT JOIN mail.payloads p ON p.delivery_id = d.delivery_id
WHERE d.delivery_id = %(delivery_id)s;

-- name: delivery_status
SELECT status FROM mail.deliveries WHERE delivery_id = %(delivery_id)s;

-- name: delivery_retry
-- Back on the schedule with a fresh ladder, in one conditional statement: only a failed or
-- dead-lettered delivery matches, and its dead-letter entry goes in the same statement. Recipients
-- already accepted keep their outcome (they are never sent the message again); the others are
-- tried again. The count of consecutive interrupted attempts starts again too
-- (MAIL_MAX_INTERRUPTED).
WITH retried AS (
    UPDATE mail.deliveries d
    SET status = CASE WHEN EXISTS (SELECT 1 FROM mail.payloads p
                                   WHERE p.delivery_id = d.delivery_id AND p.rendered_at IS NOT NULL)
                      THEN 'rendered' ELSE 'queued' END,
        status_reason = NULL,
        recipient_outcomes = (SELECT jsonb_agg(o ORDER BY n)
                              FROM jsonb_array_elements(d.recipient_outcomes) WITH ORDINALITY AS e(o, n)
                              WHERE o->>'status' = 'accepted'),
        ladder_step = 0,
        interrupted_streak = 0,
        next_attempt_at = now(),
        schedule_entered_at = now(),
        updated_at = now()
    WHERE d.delivery_id = %(delivery_id)s AND d.status IN ('failed', 'dead_letter')
    RETURNING d.delivery_id
), dropped AS (
    DELETE FROM mail.dead_letters dl USING retried r WHERE dl.delivery_id = r.delivery_id
    RETURNING dl.delivery_id
)
SELECT r.delivery_id, (SELECT count(*) FROM dropped) AS dead_letters_deleted FROM retried r;

-- name: schedule_notify
SELECT pg_notify('mail_schedule', '');

-- name: delivery_cancel
-- One conditional UPDATE: a cancel racing the scheduler's claim (FOR UPDATE SKIP LOCKED) either
-- wins (the claim skips or re-checks the row and finds it cancelled) or finds it `sending`.
UPDATE mail.deliveries
SET status = 'cancelled',
    status_reason = 'cancelled by operator',
    next_attempt_at = NULL,
    updated_at = now()
WHERE delivery_id = %(delivery_id)s AND status IN ('queued', 'rendered')
RETURNING delivery_id;

-- name: dead_letters_list
-- Newest first by (created_at DESC, delivery_id DESC) on dead_letters_created_at_idx; each entry
-- with its delivery's summary and its last attempt.
SELECT dl.delivery_id, dl.reason, dl.created_at,
       d.source, d.status, d.template_id, d.recipients, d.attempt_count, d.message_id,
       a.attempt_no AS last_attempt_no, a.status AS last_attempt_status,
       a.provider_summary AS last_provider_summary, a.finished_at AS last_attempt_finished_at
FROM mail.dead_letters dl
JOIN mail.deliveries d ON d.delivery_id = dl.delivery_id
LEFT JOIN LATERAL (
    SELECT attempt_no, status, provider_summary, finished_at FROM mail.attempts
    WHERE delivery_id = dl.delivery_id ORDER BY attempt_no DESC LIMIT 1
) a ON true
WHERE {filters}
ORDER BY dl.created_at DESC, dl.delivery_id DESC
LIMIT %(limit)s;

-- name: dead_letters_filter_after
(dl.created_at, dl.delivery_id) < (%(after_created_at)s, %(after_delivery_id)s);

-- name: malformed_list
-- Newest first by id on the primary key, or on malformed_commands_code_idx with failure_code.
SELECT id, failure_code, failure_detail, stream_entry_id, delivery_id, source, fields, received_at
FROM mail.malformed_commands
WHERE {filters}
ORDER BY id DESC
LIMIT %(limit)s;

-- name: malformed_filter_code
failure_code = %(failure_code)s;

-- name: malformed_filter_after
id < %(after_id)s;

-- name: schedule_summary
-- One statement, one snapshot: counts by status and the age of the oldest waiting delivery.
SELECT
    (SELECT coalesce(jsonb_object_agg(status, n), '{}'::jsonb)
     FROM (SELECT status, count(*) AS n FROM mail.deliveries GROUP BY status) s) AS by_status,
    (SELECT coalesce(greatest(0, floor(extract(epoch FROM now() - min(schedule_entered_at)) * 1000)), 0)::bigint
     FROM mail.deliveries WHERE status IN ('queued', 'rendered')) AS oldest_age_ms;

-- name: schedule_gauges
-- The schedule gauges' refresh: the waiting slice only, through the partial index of the schedule.
SELECT count(*) AS depth,
       coalesce(greatest(0, floor(extract(epoch FROM now() - min(schedule_entered_at)) * 1000)), 0)::bigint
           AS oldest_age_ms
FROM mail.deliveries WHERE status IN ('queued', 'rendered');

-- name: recent_failures
-- The operator console's overview: dead letters and malformed commands of the last hour, each
-- counted on its own time index (dead_letters_created_at_idx, malformed_commands_received_at_idx).
SELECT (SELECT count(*) FROM mail.dead_letters WHERE created_at > now() - interval '1 hour') AS dead_letters,
       (SELECT count(*) FROM mail.malformed_commands WHERE received_at > now() - interval '1 hour')
           AS malformed_commands,
       date_trunc('minute', now()) AS current_minute;

-- name: outcome_rates
-- Deliveries that reached a final status in each of the last %(minutes)s minutes (the current one
-- included), by status: a range scan of the partial index deliveries_terminal_updated_at_idx.
SELECT date_trunc('minute', updated_at) AS minute, status, count(*) AS n
FROM mail.deliveries
WHERE status IN ('sent', 'suppressed', 'failed', 'dead_letter', 'cancelled')
  AND updated_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
GROUP BY 1, 2
ORDER BY 1, 2;

-- name: lease_holders
-- The instances holding leases now, through the partial index of in-flight rows.
SELECT lease_owner AS instance_id, count(*) AS deliveries,
       min(lease_started_at) AS oldest_lease_started_at, max(lease_expires_at) AS latest_lease_expires_at
FROM mail.deliveries
WHERE status = 'sending'
GROUP BY lease_owner
ORDER BY lease_owner;
