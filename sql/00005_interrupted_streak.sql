-- +goose Up
-- Consecutive `interrupted` attempts of a delivery (lease rescued, restart rescue, put back at a
-- shutdown deadline); any other attempt resets it. After MAIL_MAX_INTERRUPTED of them in a row the
-- delivery is dead-lettered (`repeatedly interrupted`), so a delivery that kills the process
-- sending it (out of memory, a native crash) takes down at most that many processes.
-- A constant default: no table rewrite.
ALTER TABLE mail.deliveries
    ADD COLUMN interrupted_streak integer NOT NULL DEFAULT 0
        CONSTRAINT deliveries_interrupted_streak_check CHECK (interrupted_streak >= 0);

-- +goose Down
ALTER TABLE mail.deliveries DROP COLUMN interrupted_streak;
