-- name: delivery_get
SELECT d.*, dl.reason AS dl_reason, dl.created_at AS dl_created_at
FROM mail.deliveries d
LEFT JOIN mail.dead_letters dl ON dl.delivery_id = d.delivery_id
WHERE d.delivery_id = %(delivery_id)s;

-- name: attempts_for_delivery
SELECT attempt_no, status, started_at, finished_at, duration_ms, provider_summary, instance_id
FROM mail.attempts WHERE delivery_id = %(delivery_id)s ORDER BY attempt_no;
