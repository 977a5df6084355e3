-- +goose Up
-- Each envelope recipient's own outcome (email, status, last reply, attempt), written by the
-- attempt's outcome statement when the delivery has more than one recipient; NULL otherwise (one
-- recipient: the delivery's status and status_reason say it all).
-- A retry goes only to the recipients still deferred here; the delivery is final when all are.
ALTER TABLE mail.deliveries ADD COLUMN recipient_outcomes jsonb
    CONSTRAINT deliveries_recipient_outcomes_array
    CHECK (recipient_outcomes IS NULL OR jsonb_typeof(recipient_outcomes) = 'array');

-- +goose Down
ALTER TABLE mail.deliveries DROP COLUMN recipient_outcomes;
