-- The SQL retention worker (CONTRACT §2: MAIL_RETENTION_PERIOD, MAIL_RETENTION_INTERVAL).
-- Every batch is one transaction that first takes the retention advisory lock without waiting:
-- when another instance holds it, this one skips its run.

-- name: retention_try_lock
SELECT pg_try_advisory_xact_lock(%(lock_id)s) AS locked;

-- name: retention_delete_deliveries
-- Terminal deliveries not updated for the retention period, oldest first, through
-- deliveries_terminal_updated_at_idx; payloads, attempts and dead letters go by ON DELETE CASCADE.
-- Rows locked by a concurrent operator verb are skipped and looked at again next run.
DELETE FROM mail.deliveries
WHERE delivery_id IN (
    SELECT delivery_id FROM mail.deliveries
    WHERE status IN ('sent', 'suppressed', 'failed', 'dead_letter', 'cancelled')
      AND updated_at < now() - make_interval(secs => %(period_s)s)
    ORDER BY updated_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
);

-- name: retention_delete_malformed
DELETE FROM mail.malformed_commands
WHERE id IN (
    SELECT id FROM mail.malformed_commands
    WHERE received_at < now() - make_interval(secs => %(period_s)s)
    ORDER BY received_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
);

-- name: retention_delete_reservations
-- Idempotency reservations past their expiry (max(accepted, send_at) + MAIL_IDEMPOTENCY_TTL),
-- never one whose delivery is not final yet.
DELETE FROM mail.idempotency_reservations
WHERE (source, idempotency_key) IN (
    SELECT r.source, r.idempotency_key FROM mail.idempotency_reservations r
    WHERE r.expires_at < now()
      AND NOT EXISTS (SELECT 1 FROM mail.deliveries d
                      WHERE d.delivery_id = r.delivery_id AND d.status IN ('queued', 'rendered', 'sending'))
    ORDER BY r.expires_at
    LIMIT %(batch)s
    FOR UPDATE OF r SKIP LOCKED
);

-- name: retention_delete_published_events
-- Outbox rows published longer ago than MAIL_EVENT_OUTBOX_RETENTION, oldest first, through
-- delivery_events_published_at_idx. Unpublished rows are never deleted.
DELETE FROM mail.delivery_events
WHERE seq IN (
    SELECT seq FROM mail.delivery_events
    WHERE published_at < now() - make_interval(secs => %(period_s)s)
    ORDER BY published_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
);
