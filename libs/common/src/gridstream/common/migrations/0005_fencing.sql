-- gridstream ledger, version 5: fencing tokens of the single-writer services.
--
-- Risk and the executor run one active replica and standbys (gridstream.common.lease).
-- Taking the active role in Redis increments the service's fencing token; the new active
-- replica records it here (service_fences, only ever raised) and sets it on each of its
-- Postgres sessions (gridstream.fence_service / gridstream.fence_token). Every statement
-- that writes the tables the service owns checks, in the writing transaction, that the
-- session's token is not older than the recorded one: a stale replica that still believes
-- it is active (a pause longer than its lease) has its writes refused (SQLSTATE GSF01)
-- and stops. Sessions without a token (tools, tests, `gridstream ledger`) are not fenced.

CREATE TABLE IF NOT EXISTS service_fences (
    service text PRIMARY KEY,
    token bigint NOT NULL,
    ts_updated timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION gs_check_fence() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    svc text := current_setting('gridstream.fence_service', true);
    mine text := current_setting('gridstream.fence_token', true);
    current_token bigint;
BEGIN
    IF svc IS NULL OR svc = '' OR mine IS NULL OR mine = '' THEN
        RETURN NULL;
    END IF;
    SELECT token INTO current_token FROM service_fences WHERE service = svc;
    IF current_token IS NOT NULL AND current_token > mine::bigint THEN
        RAISE EXCEPTION 'fenced out: % replica holds token % but % is current',
            svc, mine, current_token USING ERRCODE = 'GSF01';
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS orders_fence ON orders;
CREATE TRIGGER orders_fence BEFORE INSERT OR UPDATE OR DELETE ON orders
    FOR EACH STATEMENT EXECUTE FUNCTION gs_check_fence();
DROP TRIGGER IF EXISTS order_events_fence ON order_events;
CREATE TRIGGER order_events_fence BEFORE INSERT OR UPDATE OR DELETE ON order_events
    FOR EACH STATEMENT EXECUTE FUNCTION gs_check_fence();
DROP TRIGGER IF EXISTS fills_fence ON fills;
CREATE TRIGGER fills_fence BEFORE INSERT OR UPDATE OR DELETE ON fills
    FOR EACH STATEMENT EXECUTE FUNCTION gs_check_fence();
DROP TRIGGER IF EXISTS risk_verdicts_fence ON risk_verdicts;
CREATE TRIGGER risk_verdicts_fence BEFORE INSERT OR UPDATE OR DELETE ON risk_verdicts
    FOR EACH STATEMENT EXECUTE FUNCTION gs_check_fence();
