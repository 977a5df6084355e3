-- +goose Up
-- Intake's one-statement commit of a small round (store.intake.accept_whole): the accept statement
-- runs on its own, as its own transaction, and either accepts every command of the round or
-- fails as a whole. This guard raises for a command the statement could not accept, so that the
-- statement's reservations and deliveries are rolled back with it; the consumer then commits the
-- round the usual way, in a transaction that looks at each command it could not accept. With
-- `whole` false the guard lets every row through (the statement of that transaction).
-- +goose StatementBegin
CREATE FUNCTION mail.intake_round_guard(whole boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF whole THEN
        RAISE EXCEPTION 'not every command of the round could be accepted'
            USING ERRCODE = 'MT409';
    END IF;
    RETURN true;
END
$$;
-- +goose StatementEnd

-- +goose Down
DROP FUNCTION mail.intake_round_guard(boolean);
