-- +goose Up
-- The resolved locale is stored with the rendered content, so that storing a render touches only
-- mail.payloads (whose one index is its primary key) and never rewrites the deliveries row with
-- all its indexes; the delivery's own resolved_locale is set by the attempt's outcome.
ALTER TABLE mail.payloads ADD COLUMN resolved_locale text;
UPDATE mail.payloads p
SET resolved_locale = d.resolved_locale
FROM mail.deliveries d
WHERE d.delivery_id = p.delivery_id AND p.rendered_at IS NOT NULL AND d.resolved_locale IS NOT NULL;

-- +goose Down
UPDATE mail.deliveries d
SET resolved_locale = p.resolved_locale
FROM mail.payloads p
WHERE p.delivery_id = d.delivery_id AND d.resolved_locale IS NULL AND p.resolved_locale IS NOT NULL;
ALTER TABLE mail.payloads DROP COLUMN resolved_locale;
