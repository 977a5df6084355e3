-- +goose Up
-- Idempotency outlives the delivery's wait: a reservation is kept until
-- max(accepted, send_at) + MAIL_IDEMPOTENCY_TTL (and, whatever its expiry, while its delivery is
-- not final: intake never takes it over and retention never deletes it then). Reservations taken
-- before this migration are extended to the same rule, their TTL being expires_at - created_at.
UPDATE mail.idempotency_reservations r
SET expires_at = d.send_at + (r.expires_at - r.created_at)
FROM mail.deliveries d
WHERE d.delivery_id = r.delivery_id AND d.send_at IS NOT NULL
  AND d.send_at + (r.expires_at - r.created_at) > r.expires_at;

-- A stream entry older than MAIL_IDEMPOTENCY_TTL read again (a consumer group re-created on an
-- untrimmed stream) is quarantined as stale_command, never turned into a delivery.
ALTER TABLE mail.malformed_commands DROP CONSTRAINT malformed_commands_failure_code_check;
ALTER TABLE mail.malformed_commands ADD CONSTRAINT malformed_commands_failure_code_check
    CHECK (failure_code IN ('invalid_json', 'missing_field', 'invalid_field', 'invalid_locale',
                            'invalid_recipient', 'unknown_template', 'unsafe_header', 'payload_too_large',
                            'idempotency_conflict', 'stale_command'));

-- +goose Down
DELETE FROM mail.malformed_commands WHERE failure_code = 'stale_command';
ALTER TABLE mail.malformed_commands DROP CONSTRAINT malformed_commands_failure_code_check;
ALTER TABLE mail.malformed_commands ADD CONSTRAINT malformed_commands_failure_code_check
    CHECK (failure_code IN ('invalid_json', 'missing_field', 'invalid_field', 'invalid_locale',
                            'invalid_recipient', 'unknown_template', 'unsafe_header', 'payload_too_large',
                            'idempotency_conflict'));
