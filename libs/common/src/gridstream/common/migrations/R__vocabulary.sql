-- Repeatable: the ledger's value sets, rendered from the Python enums.
--
-- A vocabulary name in double braces is replaced by every value of that name in
-- gridstream.common.db.SQL_VOCABULARY (the enums of gridstream.common.ledger, and
-- gridstream.common.messages.Actions), quoted and comma-separated, so these
-- constraints are the enums and never a copy of them.
-- `migrate` applies this file after the numbered migrations, and again whenever its
-- rendered text changes: a value added to an enum reaches every database, however old,
-- at the next start, with no new migration. Removing or renaming a value needs a
-- numbered migration that first rewrites the rows holding it (and drops the constraint
-- it would violate); otherwise this file fails at ADD CONSTRAINT and `migrate` stops.
--
-- Constraint names are Postgres's own for a column CHECK (<table>_<column>_check), so
-- the inline ones of 0004 are the ones replaced here.

ALTER TABLE orders DROP CONSTRAINT IF EXISTS orders_status_check;
ALTER TABLE orders ADD CONSTRAINT orders_status_check
    CHECK (status IN ({{LedgerStatus}}));

ALTER TABLE order_events DROP CONSTRAINT IF EXISTS order_events_kind_check;
ALTER TABLE order_events ADD CONSTRAINT order_events_kind_check
    CHECK (kind IN ({{OrderEventKind}}));

ALTER TABLE risk_verdicts DROP CONSTRAINT IF EXISTS risk_verdicts_action_check;
ALTER TABLE risk_verdicts ADD CONSTRAINT risk_verdicts_action_check
    CHECK (action IN ({{IntentAction}}));

ALTER TABLE risk_verdicts DROP CONSTRAINT IF EXISTS risk_verdicts_verdict_check;
ALTER TABLE risk_verdicts ADD CONSTRAINT risk_verdicts_verdict_check
    CHECK (verdict IN ({{RiskVerdict}}));
