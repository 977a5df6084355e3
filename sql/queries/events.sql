-- The outbox of delivery events (sql/00008_delivery_events.sql): the publisher's reads and
-- marks, its advisory lock, and the operator's view.

-- name: events_try_lock
-- The publisher's session-level advisory lock, on its own connection: held while that connection
-- lives, so a publisher that dies (or loses its connection) frees it at once.
SELECT pg_try_advisory_lock(%(lock_id)s) AS locked;

-- name: events_unlock
SELECT pg_advisory_unlock(%(lock_id)s) AS unlocked;

-- name: events_fetch
-- The oldest unpublished events, in outbox order, through delivery_events_unpublished_idx, each
-- with its whole stream entry as JSON text (`entry`: the fields plus event_id, event and
-- occurred_at), which the publisher hands to Redis without parsing it.
-- The entry is the text of `fields` with the three members appended as text: none of their
-- values needs escaping (a UUID, a name the table's CHECK allows, a time of digits), and a
-- jsonb value built per row and printed again cost about twice as much. `fields` never holds
-- those three names (were it to, the later member wins in the Redis script's decoding, as the
-- right operand wins in jsonb's `||`).
SELECT seq, event,
       CASE WHEN fields = '{}' THEN '{' ELSE left(fields::text, -1) || ', ' END
           || '"event_id": "' || event_id::text || '", "event": "' || event
           || '", "occurred_at": "' || mail.event_time(created_at) || '"}' AS entry
FROM mail.delivery_events
WHERE published_at IS NULL
ORDER BY seq
LIMIT %(limit)s;

-- name: events_mark_published
UPDATE mail.delivery_events
SET published_at = now()
WHERE seq = ANY(%(seqs)s::bigint[]) AND published_at IS NULL;

-- name: events_outbox_gauges
-- Unpublished events and the age of the oldest one, through the partial index.
SELECT count(*) AS depth,
       coalesce(greatest(0, floor(extract(epoch FROM now() - min(created_at)) * 1000)), 0)::bigint
           AS oldest_age_ms
FROM mail.delivery_events
WHERE published_at IS NULL;

-- name: events_publisher
-- The instance holding the publisher's lock (its connection's application_name is
-- `mailtrio:<instance id>`), if any, in this database. A bigint advisory key shows in pg_locks
-- as classid = its high 32 bits, objid = its low 32 bits, objsubid = 1.
SELECT a.application_name
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = (%(lock_id)s::bigint >> 32)
  AND l.objid::bigint = (%(lock_id)s::bigint & 4294967295)
LIMIT 1;
