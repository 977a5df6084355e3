-- +goose Up
-- The notification slice of the schedule gets its own partial index, mirroring authsession's, so
-- the claim is an ordered index scan of due rows whatever the statistics say.
CREATE INDEX deliveries_next_attempt_at_notification_idx ON mail.deliveries (next_attempt_at)
    WHERE status IN ('queued', 'rendered') AND source = 'notification';
-- deliveries churns fast (queued -> sending -> sent) and can grow from empty to a large backlog
-- in seconds: analyze and vacuum it after a small fraction of changes, so claim plans never run
-- on statistics from an empty table.
ALTER TABLE mail.deliveries SET (
    autovacuum_analyze_scale_factor = 0.01,
    autovacuum_analyze_threshold = 1000,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000
);

-- +goose Down
ALTER TABLE mail.deliveries RESET (
    autovacuum_analyze_scale_factor,
    autovacuum_analyze_threshold,
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_threshold
);
DROP INDEX mail.deliveries_next_attempt_at_notification_idx;
