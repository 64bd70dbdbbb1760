-- r0002 under live traffic: take every table lock the revision's DDL needs before changing
-- anything, all or none. Taking them one by one as the DDL goes (ALTER TABLE store_config,
-- split_settings, batches; the status triggers on runs) deadlocked with application
-- transactions that hold one of these tables and wait for another, and the upgrade — the
-- longest waiter — was the one PostgreSQL cancelled, every time. Here each attempt waits at most
-- 200 ms per table and, failing, rolls back its subtransaction (releasing what it took) and tries
-- again, so the upgrade never holds a lock while it waits for the next one.
DO $$
DECLARE
  previous text := current_setting('lock_timeout');
  attempts integer := 0;
BEGIN
  LOOP
    BEGIN
      PERFORM set_config('lock_timeout', '200ms', true);
      LOCK TABLE runops.store_config, runops.split_settings, runops.runs, runops.batches IN ACCESS EXCLUSIVE MODE;
      PERFORM set_config('lock_timeout', previous, true);
      RETURN;
    EXCEPTION WHEN lock_not_available THEN
      attempts := attempts + 1;
      IF attempts >= 600 THEN
        RAISE EXCEPTION 'r0002 could not lock the run graph in %s attempts: too busy to upgrade now', attempts;
      END IF;
      PERFORM pg_sleep(0.01 + random() * 0.04);
    END;
  END LOOP;
END
$$;
