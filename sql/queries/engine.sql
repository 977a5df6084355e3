-- The delivery engine: claims, rendered content, fenced outcomes, lease rescue.
-- Every write to a claimed delivery is fenced on its lease (lease_owner, lease_started_at; set
-- exactly while status = 'sending', by CHECK deliveries_lease_iff_sending): once a lease is lost
-- (rescued by another instance, released at shutdown) a late write is a no-op.

-- name: claim_due
-- Claim up to %(limit)s due deliveries for %(owner)s: authsession first (its own partial index),
-- then notification, each slice in next_attempt_at order, SKIP LOCKED so instances never wait on
-- each other. One statement: the row locks, the lease and the payload read happen together.
-- Each slice is limited by the batch size itself (store.engine writes %(limit)s in as a constant,
-- so that even a cached generic plan knows the batch is small and joins by primary key);
-- notification rows locked beyond the batch are merely left alone.
WITH auth AS (
    SELECT delivery_id, next_attempt_at AS due, 0 AS prio
    FROM mail.deliveries
    WHERE status IN ('queued', 'rendered') AND source = 'authsession' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), other AS (
    SELECT delivery_id, next_attempt_at AS due, 1 AS prio
    FROM mail.deliveries
    WHERE status IN ('queued', 'rendered') AND source = 'notification' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT * FROM (SELECT * FROM auth UNION ALL SELECT * FROM other) u
    ORDER BY prio, due
    LIMIT %(limit)s
)
UPDATE mail.deliveries d
SET status = 'sending',
    lease_owner = %(owner)s,
    lease_started_at = now(),
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    next_attempt_at = NULL,
    updated_at = now()
FROM picked
JOIN mail.payloads p ON p.delivery_id = picked.delivery_id
WHERE d.delivery_id = picked.delivery_id
RETURNING d.delivery_id, d.source, d.payload_mode, d.template_id, d.locale,
          coalesce(p.resolved_locale, d.resolved_locale) AS resolved_locale,
          d.recipients, d.message_id, d.attempt_count, d.ladder_step, d.traceparent,
          d.lease_started_at, picked.prio, picked.due, d.recipient_outcomes,
          p.payload, p.subject, p.text_body, p.html_body, p.headers, p.rendered_at;

-- name: next_due
-- Seconds until the earliest waiting delivery falls due (negative: already due), by the database
-- clock; NULL when nothing waits. Reads the first entry of the schedule's partial index.
SELECT extract(epoch FROM (min(next_attempt_at) - now()))::float8 AS wait_s
FROM mail.deliveries
WHERE status IN ('queued', 'rendered');

-- name: store_content
-- Store the content rendered once for claimed deliveries, with the resolved locale, fenced on the
-- lease: a read of the deliveries row, never a write (the payloads row alone changes, so the
-- deliveries indexes are left alone). `rendered_at IS NULL` keeps the first render: rendering is
-- deterministic (the catalog is immutable), so a write racing a lease rescue stores the same text.
-- Fences name the lease columns only, never `status = 'sending'`: the CHECK constraint
-- deliveries_lease_iff_sending makes them equivalent, and the planner then probes the primary
-- key rather than scanning the status index through the dead entries a busy schedule leaves.
-- The ids also come as an array (`= ANY(%(ids)s)`): an index condition with an estimate the size
-- of the batch, so that no plan, generic or made from statistics taken while the table was still
-- small, joins the rows of jsonb_to_recordset (estimated at 100) by scanning a whole table.
WITH i AS (
    SELECT *
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(
        delivery_id text, lease_started_at timestamptz, subject text, text_body text,
        html_body text, headers jsonb, resolved_locale text)
)
UPDATE mail.payloads p
SET subject = i.subject,
    text_body = i.text_body,
    html_body = i.html_body,
    headers = i.headers,
    resolved_locale = i.resolved_locale,
    rendered_at = now()
FROM i
JOIN mail.deliveries d ON d.delivery_id = i.delivery_id
WHERE p.delivery_id = i.delivery_id AND p.rendered_at IS NULL
  AND p.delivery_id = ANY(%(ids)s::text[]) AND d.delivery_id = ANY(%(ids)s::text[])
  AND d.lease_owner = %(owner)s
  AND d.lease_started_at = i.lease_started_at
RETURNING p.delivery_id;

-- name: finish_attempts
-- Record the end of claimed attempts (fenced): the delivery's next status, its attempt row (when
-- an attempt took place), its place on the retry ladder and, for a dead letter, the matching
-- dead_letters row, all in one statement. `retry_ms` NULL = terminal; otherwise the delivery goes
-- back on the schedule that many milliseconds from now (`reenter`: it re-enters the schedule now,
-- for the age metric; `keep_reason`: a released claim keeps its status_reason; `resolved_locale`:
-- the locale the stored content was rendered in; `recipient_outcomes`: every envelope recipient's
-- outcome, given only when there is more than one recipient, otherwise the stored value stays).
-- Returns the ids whose fence held (the lease columns, see store_content).
WITH i AS (
    SELECT *
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(
        delivery_id text, lease_started_at timestamptz, status text, status_reason text,
        attempt_status text, elapsed_ms integer, provider_summary text, details jsonb,
        retry_ms bigint, ladder_step integer, reenter boolean, keep_reason boolean,
        dead_reason text, resolved_locale text, recipient_outcomes jsonb)
), d AS (
    UPDATE mail.deliveries d
    SET status = i.status,
        status_reason = CASE WHEN i.keep_reason THEN d.status_reason ELSE i.status_reason END,
        attempt_count = d.attempt_count + (i.attempt_status IS NOT NULL)::int,
        ladder_step = i.ladder_step,
        next_attempt_at = CASE WHEN i.retry_ms IS NULL THEN NULL
                               ELSE now() + make_interval(secs => i.retry_ms / 1000.0) END,
        schedule_entered_at = CASE WHEN i.retry_ms IS NOT NULL AND i.reenter THEN now()
                                   ELSE d.schedule_entered_at END,
        resolved_locale = coalesce(i.resolved_locale, d.resolved_locale),
        recipient_outcomes = coalesce(i.recipient_outcomes, d.recipient_outcomes),
        lease_owner = NULL,
        lease_started_at = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM i
    WHERE d.delivery_id = i.delivery_id
      AND d.delivery_id = ANY(%(ids)s::text[])
      AND d.lease_owner = %(owner)s
      AND d.lease_started_at = i.lease_started_at
    RETURNING d.delivery_id, d.attempt_count
), a AS (
    INSERT INTO mail.attempts (delivery_id, attempt_no, status, started_at, finished_at, duration_ms,
                               provider_summary, details, instance_id)
    SELECT i.delivery_id, d.attempt_count, i.attempt_status, i.lease_started_at,
           i.lease_started_at + make_interval(secs => i.elapsed_ms / 1000.0), i.elapsed_ms,
           i.provider_summary, i.details, %(owner)s
    FROM i JOIN d ON d.delivery_id = i.delivery_id
    WHERE i.attempt_status IS NOT NULL
), dl AS (
    INSERT INTO mail.dead_letters (delivery_id, reason)
    SELECT i.delivery_id, i.dead_reason
    FROM i JOIN d ON d.delivery_id = i.delivery_id
    WHERE i.dead_reason IS NOT NULL
    ON CONFLICT (delivery_id) DO UPDATE SET reason = EXCLUDED.reason, created_at = now()
)
SELECT delivery_id FROM d;

-- name: rescue_leases
-- Put claimed deliveries back on the schedule, due now, recording the unfinished attempt as
-- `interrupted` under the instance that held the lease. Two callers: every instance, for leases
-- that expired (their instance died mid-attempt; %(owner)s NULL), and an instance at startup,
-- before its first claim, for leases still held under its own id (MAIL_INSTANCE_ID is unique
-- among live instances, so they belong to a previous run of it). SKIP LOCKED and the status
-- condition make sure exactly one instance rescues each delivery.
WITH expired AS (
    SELECT d.delivery_id
    FROM mail.deliveries d
    WHERE d.status = 'sending'
      AND CASE WHEN %(owner)s::text IS NULL THEN d.lease_expires_at < now()
               ELSE d.lease_owner = %(owner)s::text END
    ORDER BY d.lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), prev AS (
    SELECT d.delivery_id, d.attempt_count, d.lease_owner, d.lease_started_at, d.lease_expires_at,
           (p.rendered_at IS NOT NULL) AS rendered, p.resolved_locale
    FROM mail.deliveries d
    JOIN expired e ON e.delivery_id = d.delivery_id
    JOIN mail.payloads p ON p.delivery_id = d.delivery_id
), d AS (
    UPDATE mail.deliveries d
    SET status = CASE WHEN prev.rendered THEN 'rendered' ELSE 'queued' END,
        status_reason = CASE WHEN %(owner)s::text IS NULL
                             THEN 'interrupted: lease of ' || prev.lease_owner || ' expired'
                             ELSE 'interrupted: a previous run of ' || prev.lease_owner
                                  || ' stopped mid-attempt' END,
        attempt_count = d.attempt_count + 1,
        resolved_locale = CASE WHEN prev.rendered THEN coalesce(prev.resolved_locale, d.resolved_locale)
                               ELSE d.resolved_locale END,
        next_attempt_at = now(),
        schedule_entered_at = now(),
        lease_owner = NULL,
        lease_started_at = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM prev
    WHERE d.delivery_id = prev.delivery_id AND d.status = 'sending'
    RETURNING d.delivery_id, d.attempt_count
)
INSERT INTO mail.attempts (delivery_id, attempt_no, status, started_at, finished_at, duration_ms,
                           provider_summary, details, instance_id)
SELECT prev.delivery_id, d.attempt_count, 'interrupted', prev.lease_started_at, now(),
       greatest(0, (extract(epoch FROM (now() - prev.lease_started_at)) * 1000)::int),
       CASE WHEN %(owner)s::text IS NULL THEN 'interrupted: lease expired, outcome unknown'
            ELSE 'interrupted: the instance restarted mid-attempt, outcome unknown' END,
       jsonb_build_object('rescued_by', %(rescuer)s::text, 'lease_expires_at', prev.lease_expires_at),
       prev.lease_owner
FROM prev JOIN d ON d.delivery_id = prev.delivery_id
RETURNING delivery_id, instance_id;

-- name: notify_schedule
SELECT pg_notify('mail_schedule', '');
