-- +goose Up
-- mail.attempt_schedule.oldest_age_ms reads min(schedule_entered_at) over waiting deliveries:
-- a partial index makes that one index probe whatever the backlog.
CREATE INDEX deliveries_waiting_entered_at_idx ON mail.deliveries (schedule_entered_at)
    WHERE status IN ('queued', 'rendered');

-- +goose Down
DROP INDEX mail.deliveries_waiting_entered_at_idx;
