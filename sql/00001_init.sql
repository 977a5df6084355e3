-- +goose Up
-- The durable state of mailtrio. Schema `mail` is provisioned externally for the service role;
-- these tables live inside it. Constraints make illegal states unrepresentable.

CREATE TABLE mail.deliveries (
    delivery_id        text        PRIMARY KEY
                                   CHECK (delivery_id ~ '^[A-Za-z0-9._:-]{1,128}$'),
    source             text        NOT NULL CHECK (source IN ('authsession', 'notification')),
    idempotency_key    text        NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    status             text        NOT NULL CHECK (status IN ('queued', 'rendered', 'sending', 'sent',
                                       'suppressed', 'failed', 'dead_letter', 'cancelled')),
    status_reason      text,
    payload_mode       text        NOT NULL CHECK (payload_mode IN ('template', 'rendered')),
    template_id        text        CHECK ((payload_mode = 'template') = (template_id IS NOT NULL)),
    locale             text        NOT NULL,
    resolved_locale    text,
    -- {"to": [{"email", "name"}...], "cc": [...], "bcc": [...]}
    recipients         jsonb       NOT NULL,
    -- lower-cased addresses of to, cc and bcc, for the recipient filter of the operator API
    recipient_emails   text[]      NOT NULL,
    send_at            timestamptz,
    -- when the delivery is (next) due; set exactly while it waits on the schedule
    next_attempt_at    timestamptz,
    -- the moment it (re-)entered the schedule: acceptance, last failed attempt, or send_at if later
    schedule_entered_at timestamptz,
    attempt_count      integer     NOT NULL DEFAULT 0 CHECK (attempt_count >= 0),
    -- position on the retry ladder: retryable failures since acceptance or the last operator retry
    ladder_step        integer     NOT NULL DEFAULT 0 CHECK (ladder_step >= 0),
    message_id         text        NOT NULL,
    lease_owner        text,
    lease_expires_at   timestamptz,
    lease_started_at   timestamptz,
    traceparent        text,
    stream_entry_id    text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT deliveries_waiting_has_due
        CHECK ((status IN ('queued', 'rendered')) = (next_attempt_at IS NOT NULL)),
    CONSTRAINT deliveries_lease_iff_sending
        CHECK ((status = 'sending') = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL
                                      AND lease_started_at IS NOT NULL)),
    CONSTRAINT deliveries_lease_fields_together
        CHECK ((lease_owner IS NULL) = (lease_expires_at IS NULL)
               AND (lease_owner IS NULL) = (lease_started_at IS NULL))
);

-- The schedule: due deliveries are claimed through this partial index with FOR UPDATE SKIP LOCKED.
CREATE INDEX deliveries_next_attempt_at_idx ON mail.deliveries (next_attempt_at)
    WHERE status IN ('queued', 'rendered');
-- authsession is claimed before notification: its own slice of the schedule.
CREATE INDEX deliveries_next_attempt_at_auth_idx ON mail.deliveries (next_attempt_at)
    WHERE status IN ('queued', 'rendered') AND source = 'authsession';
-- lease rescue scans only the in-flight rows.
CREATE INDEX deliveries_lease_expires_at_idx ON mail.deliveries (lease_expires_at)
    WHERE status = 'sending';
-- operator listing: newest first, with keyset cursors on (created_at, delivery_id).
CREATE INDEX deliveries_created_at_idx ON mail.deliveries (created_at DESC, delivery_id DESC);
CREATE INDEX deliveries_status_created_at_idx ON mail.deliveries (status, created_at DESC, delivery_id DESC);
CREATE INDEX deliveries_recipient_emails_idx ON mail.deliveries USING gin (recipient_emails);
-- retention: terminal rows by age.
CREATE INDEX deliveries_terminal_updated_at_idx ON mail.deliveries (updated_at)
    WHERE status IN ('sent', 'suppressed', 'failed', 'dead_letter', 'cancelled');

-- The command payload as accepted, and the content rendered once from it.
CREATE TABLE mail.payloads (
    delivery_id   text        PRIMARY KEY REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE,
    payload       jsonb       NOT NULL,
    subject       text,
    text_body     text,
    html_body     text,
    headers       jsonb,
    rendered_at   timestamptz,
    CONSTRAINT payloads_rendered_complete CHECK (
        (rendered_at IS NULL AND subject IS NULL AND text_body IS NULL AND html_body IS NULL)
        OR (rendered_at IS NOT NULL AND btrim(subject) <> ''
            AND (btrim(coalesce(text_body, '')) <> '' OR btrim(coalesce(html_body, '')) <> '')))
);

CREATE TABLE mail.attempts (
    delivery_id       text        NOT NULL REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE,
    attempt_no        integer     NOT NULL CHECK (attempt_no >= 1),
    status            text        NOT NULL CHECK (status IN ('provider_accepted', 'provider_rejected',
                                      'provider_deferred', 'transport_failed', 'timed_out',
                                      'suppressed', 'interrupted')),
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL,
    duration_ms       integer     NOT NULL CHECK (duration_ms >= 0),
    provider_summary  text,
    -- per-recipient replies and other structured detail
    details           jsonb,
    instance_id       text        NOT NULL,
    PRIMARY KEY (delivery_id, attempt_no)
);

CREATE TABLE mail.dead_letters (
    delivery_id  text        PRIMARY KEY REFERENCES mail.deliveries (delivery_id) ON DELETE CASCADE,
    reason       text        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_created_at_idx ON mail.dead_letters (created_at DESC, delivery_id DESC);

-- One reservation per (source, idempotency_key) for MAIL_IDEMPOTENCY_TTL. The fingerprint is a
-- hash of every command field but traceparent: same key + same fingerprint = duplicate.
CREATE TABLE mail.idempotency_reservations (
    source           text        NOT NULL CHECK (source IN ('authsession', 'notification')),
    idempotency_key  text        NOT NULL,
    delivery_id      text        NOT NULL,
    fingerprint      text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (source, idempotency_key)
);
CREATE INDEX idempotency_reservations_expires_at_idx ON mail.idempotency_reservations (expires_at);

CREATE TABLE mail.malformed_commands (
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    failure_code     text        NOT NULL CHECK (failure_code IN ('invalid_json', 'missing_field',
                                     'invalid_field', 'invalid_locale', 'invalid_recipient',
                                     'unknown_template', 'unsafe_header', 'payload_too_large',
                                     'idempotency_conflict')),
    failure_detail   text        NOT NULL,
    stream_entry_id  text        NOT NULL,
    delivery_id      text,
    source           text,
    -- the raw stream entry (field -> value; undecodable bytes escaped)
    fields           jsonb       NOT NULL,
    received_at      timestamptz NOT NULL DEFAULT now()
);
-- a stream entry redelivered after a crash between commit and XACK is recorded once
CREATE UNIQUE INDEX malformed_commands_stream_entry_id_key ON mail.malformed_commands (stream_entry_id);
CREATE INDEX malformed_commands_received_at_idx ON mail.malformed_commands (received_at DESC, id DESC);
CREATE INDEX malformed_commands_code_idx ON mail.malformed_commands (failure_code, id DESC);

-- +goose Down
DROP TABLE mail.malformed_commands;
DROP TABLE mail.idempotency_reservations;
DROP TABLE mail.dead_letters;
DROP TABLE mail.attempts;
DROP TABLE mail.payloads;
DROP TABLE mail.deliveries;
