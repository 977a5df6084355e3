-- The delivery engine: claims, rendered content, fenced outcomes, lease rescue.
-- Every write to a claimed delivery is fenced on its lease (lease_owner, lease_started_at; set
-- exactly while status = 'sending', by CHECK deliveries_lease_iff_sending): once a lease is lost
-- (rescued by another instance, released at shutdown) a late write is a no-op.

-- name: claim_due
-- Claim up to %(limit)s due deliveries for %(owner)s: authsession first (its own partial index),
-- then notification, each slice in next_attempt_at order, SKIP LOCKED so instances never wait on
-- each other. One statement: the row locks, the lease and the payload read happen together.
-- The JSON columns come back as text and are decoded row by row (store.engine.Claim.from_row),
-- so that one row that cannot be decoded (nesting past the recursion limit) fails alone instead
-- of failing the fetch of its whole batch.
-- Each slice is limited by the batch size itself (store.engine writes %(limit)s in as a constant,
-- so that even a cached generic plan knows the batch is small and joins by primary key);
-- notification rows locked beyond the batch are merely left alone.
-- The same statement reads when the next waiting delivery falls due (`wait_s`, seconds by the
-- database clock, NULL when nothing waits), leaving out the rows just picked (every CTE sees the
-- snapshot from before the UPDATE), so a claim is one round trip. It always returns at least one
-- row: with nothing claimed, a row whose claim columns are NULL carries `wait_s` alone.
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
), claimed AS (
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
          d.recipients::text AS recipients, d.message_id, d.attempt_count, d.ladder_step,
          d.interrupted_streak, d.traceparent, d.lease_started_at, picked.prio, picked.due,
          d.recipient_outcomes::text AS recipient_outcomes,
          p.payload::text AS payload, p.subject, p.text_body, p.html_body, p.headers::text AS headers,
          p.rendered_at
), waiting AS (
    SELECT extract(epoch FROM (min(next_attempt_at) - now()))::float8 AS wait_s
    FROM mail.deliveries
    WHERE status IN ('queued', 'rendered')
      AND delivery_id <> ALL (ARRAY(SELECT delivery_id FROM picked))
)
SELECT claimed.*, waiting.wait_s
FROM waiting LEFT JOIN claimed ON true;

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
-- The statement turns synchronous_commit off for its own transaction (set_config, local): it runs
-- alone, as its own transaction, and nothing should wait for this commit's WAL flush (see
-- store.engine.claim_batch: the claim before it was flushed, the outcome after it will be).
WITH i AS (
    SELECT *
    FROM jsonb_to_recordset(%(rows)s::jsonb) AS t(
        delivery_id text, lease_started_at timestamptz, subject text, text_body text,
        html_body text, headers jsonb, resolved_locale text)
    WHERE set_config('synchronous_commit', 'off', true) = 'off'
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
-- An `interrupted` attempt adds one to the delivery's interrupted_streak, any other attempt resets
-- it (a claim given back without an attempt leaves it). Returns the ids whose fence held (the
-- lease columns, see store_content).
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
        interrupted_streak = CASE WHEN i.attempt_status IS NULL THEN d.interrupted_streak
                                  WHEN i.attempt_status = 'interrupted' THEN d.interrupted_streak + 1
                                  ELSE 0 END,
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
-- `interrupted` under the instance that held the lease. Two callers:
-- * every instance, for leases that expired (%(owner)s NULL) and whose owner is provably gone:
--   no session holds the owner's identity lock (identity_lock below). An owner that is alive but
--   late (stopped by SIGSTOP, stalled) keeps its deliveries; it gives back unsent what it finds
--   it has no lease time left for when it resumes. The rescuer's own expired leases are rescued
--   too, except those it still holds (%(held)s: it gives them back itself); the others were lost
--   on their way (a claim committed whose reply never arrived, an outcome write given up).
-- * an instance at startup, right after it took its identity lock and before its first claim,
--   for leases still held under its own id: holding the lock proves the previous run is gone.
-- SKIP LOCKED and the status condition make sure exactly one instance rescues each delivery.
-- The interrupted attempt that makes %(max_interrupted)s in a row (MAIL_MAX_INTERRUPTED)
-- dead-letters the delivery instead, with its mail.dead_letters row.
WITH live AS MATERIALIZED (
    -- identity locks held right now (session advisory locks taken with one bigint key)
    SELECT (l.classid::bigint << 32) | l.objid::bigint AS lock_key
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
), expired AS (
    SELECT d.delivery_id
    FROM mail.deliveries d
    WHERE d.status = 'sending'
      AND CASE WHEN %(owner)s::text IS NULL
               THEN d.lease_expires_at < now()
                    AND CASE WHEN d.lease_owner = %(rescuer)s::text
                             THEN d.delivery_id <> ALL(%(held)s::text[])
                             ELSE hashtextextended('mailtrio.instance:' || d.lease_owner, 0)
                                  NOT IN (SELECT lock_key FROM live) END
               ELSE d.lease_owner = %(owner)s::text END
    ORDER BY d.lease_expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), prev AS (
    SELECT d.delivery_id, d.attempt_count, d.lease_owner, d.lease_started_at, d.lease_expires_at,
           (p.rendered_at IS NOT NULL) AS rendered, p.resolved_locale,
           d.interrupted_streak + 1 >= %(max_interrupted)s AS dead
    FROM mail.deliveries d
    JOIN expired e ON e.delivery_id = d.delivery_id
    JOIN mail.payloads p ON p.delivery_id = d.delivery_id
), d AS (
    UPDATE mail.deliveries d
    SET status = CASE WHEN prev.dead THEN 'dead_letter'
                      WHEN prev.rendered THEN 'rendered' ELSE 'queued' END,
        status_reason = CASE WHEN prev.dead
                             THEN 'repeatedly interrupted: ' || (d.interrupted_streak + 1)
                                  || ' consecutive attempts interrupted, outcome unknown'
                             WHEN %(owner)s::text IS NULL
                             THEN 'interrupted: lease of ' || prev.lease_owner || ' expired'
                             ELSE 'interrupted: a previous run of ' || prev.lease_owner
                                  || ' stopped mid-attempt' END,
        attempt_count = d.attempt_count + 1,
        interrupted_streak = d.interrupted_streak + 1,
        resolved_locale = CASE WHEN prev.rendered THEN coalesce(prev.resolved_locale, d.resolved_locale)
                               ELSE d.resolved_locale END,
        next_attempt_at = CASE WHEN prev.dead THEN NULL ELSE now() END,
        schedule_entered_at = now(),
        lease_owner = NULL,
        lease_started_at = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    FROM prev
    WHERE d.delivery_id = prev.delivery_id AND d.status = 'sending'
    RETURNING d.delivery_id, d.attempt_count, d.status, d.status_reason
), dl AS (
    INSERT INTO mail.dead_letters (delivery_id, reason)
    SELECT d.delivery_id, d.status_reason
    FROM d
    WHERE d.status = 'dead_letter'
    ON CONFLICT (delivery_id) DO UPDATE SET reason = EXCLUDED.reason, created_at = now()
), a AS (
    INSERT INTO mail.attempts (delivery_id, attempt_no, status, started_at, finished_at, duration_ms,
                               provider_summary, details, instance_id)
    SELECT prev.delivery_id, d.attempt_count, 'interrupted', prev.lease_started_at, now(),
           greatest(0, (extract(epoch FROM (now() - prev.lease_started_at)) * 1000)::int),
           CASE WHEN %(owner)s::text IS NULL THEN 'interrupted: lease expired, outcome unknown'
                ELSE 'interrupted: the instance restarted mid-attempt, outcome unknown' END,
           jsonb_build_object('rescued_by', %(rescuer)s::text, 'lease_expires_at', prev.lease_expires_at),
           prev.lease_owner
    FROM prev JOIN d ON d.delivery_id = prev.delivery_id
)
SELECT d.delivery_id, prev.lease_owner AS instance_id, d.status, d.status_reason
FROM d JOIN prev ON prev.delivery_id = d.delivery_id;

-- name: identity_lock
-- The instance's identity (MAIL_INSTANCE_ID) as a session-level advisory lock, taken on a
-- dedicated connection held for the life of the process: one identity, one live process. The
-- key is a 64-bit hash of the id (rescue_leases computes the same key to see whether a lease's
-- owner is alive). Server-side keepalives on this session let PostgreSQL notice a vanished host
-- (and release its lock) within about 25 s rather than hours.
SELECT pg_try_advisory_lock(hashtextextended('mailtrio.instance:' || %(instance_id)s, 0)) AS acquired,
       pg_backend_pid() AS pid,
       set_config('tcp_keepalives_idle', '10', false) IS NOT NULL AS keepalive_idle,
       set_config('tcp_keepalives_interval', '5', false) IS NOT NULL AS keepalive_interval,
       set_config('tcp_keepalives_count', '3', false) IS NOT NULL AS keepalive_count;

-- name: identity_holder
-- Who holds an instance's identity lock now: the backend, its application name and since when.
SELECT l.pid, a.application_name, a.backend_start, host(a.client_addr) AS client_addr
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint)
      = hashtextextended('mailtrio.instance:' || %(instance_id)s, 0)
LIMIT 1;

-- name: identity_probe
-- The identity lock's connection is still alive (and so is the lock it holds).
SELECT 1 AS alive;

-- name: identity_release
SELECT pg_advisory_unlock(hashtextextended('mailtrio.instance:' || %(instance_id)s, 0)) AS released;

-- name: terminate_backend
-- A previous session of this very process that still holds the identity lock after its
-- connection was given up (its probe timed out): end it, so that the lock comes back.
SELECT pg_terminate_backend(%(pid)s) AS terminated;

-- name: notify_schedule
SELECT pg_notify('mail_schedule', '');
