-- +goose NO TRANSACTION
-- +goose Up
-- The same rule for delivery_id (1-128 characters of [A-Za-z0-9._:-]), written so that checking
-- it is cheap. As one counted repetition (`{1,128}`) PostgreSQL's regex engine expands the
-- bracket into 128 states and takes ~30 us per row, about a tenth of what inserting a delivery
-- costs the server at intake; an unbounded repetition beside a length bound takes ~1 us.
--
-- Without a transaction, so that writes go on while the existing rows are checked: the new
-- constraint is added NOT VALID (a brief lock; new rows are checked from then on), validated
-- (a scan that blocks no writes), and only then is the old one dropped. Each step can run again.
-- +goose StatementBegin
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'mail.deliveries'::regclass AND conname = 'deliveries_delivery_id_shape') THEN
        ALTER TABLE mail.deliveries ADD CONSTRAINT deliveries_delivery_id_shape
            CHECK (length(delivery_id) <= 128 AND delivery_id ~ '^[A-Za-z0-9._:-]+$') NOT VALID;
    END IF;
END
$$;
-- +goose StatementEnd
ALTER TABLE mail.deliveries VALIDATE CONSTRAINT deliveries_delivery_id_shape;
ALTER TABLE mail.deliveries DROP CONSTRAINT IF EXISTS deliveries_delivery_id_check;

-- +goose Down
-- +goose StatementBegin
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'mail.deliveries'::regclass AND conname = 'deliveries_delivery_id_check') THEN
        ALTER TABLE mail.deliveries ADD CONSTRAINT deliveries_delivery_id_check
            CHECK (delivery_id ~ '^[A-Za-z0-9._:-]{1,128}$') NOT VALID;
    END IF;
END
$$;
-- +goose StatementEnd
ALTER TABLE mail.deliveries VALIDATE CONSTRAINT deliveries_delivery_id_check;
ALTER TABLE mail.deliveries DROP CONSTRAINT IF EXISTS deliveries_delivery_id_shape;
