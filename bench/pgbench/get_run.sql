-- A read by id: runops.get_run of one run (:run). On the store that owns it, a point read of
-- run_view; asked of the other store, the same read through postgres_fdw.
SELECT * FROM runops.get_run(:run);
