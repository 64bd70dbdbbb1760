-- Retention (SPEC §4, purge_runs): deletes final runs older than a duration, with their
-- subgraphs (attempts, checkpoints, the edges they were blocked by), in bounded batches.
--
-- Batches are deleted only once no run names them (runs.batch_id) and their cached items go
-- with them: that, not a foreign key, keeps every runs.batch_id naming a batch (doctor --deep).
-- A run is purged only when nothing can still need it: it is final; it has no child run and
-- parents no batch (children and batches go first, in this or a later call, so foreign keys
-- hold without cascades); no pending edge in this store waits on it; no open batch counts it.
-- A finished batch goes once its runs are gone. Claims naming a purged run are judged dead.
-- Age is measured from updated_at: a final run's last change is when it turned final.

CREATE OR REPLACE FUNCTION runops.purge_runs(older_than text, max_rows integer DEFAULT 10000)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  cutoff timestamptz := now() - parse_duration(older_than, 'older_than');
  n integer := require_between(max_rows, 1, 100000, 'max_rows');
  ids text[];
  purged integer;
BEGIN
  SELECT array_agg(r.id) INTO ids
  FROM (SELECT r.id FROM runs AS r
        WHERE r.status IN (SELECT t.to_status FROM status_transitions AS t WHERE t.made_by = 'finalize_run')
          AND r.updated_at < cutoff
          AND NOT EXISTS (SELECT FROM runs AS c WHERE c.parent_run_id = r.id)
          AND NOT EXISTS (SELECT FROM batches AS b WHERE b.parent_run_id = r.id)
          AND NOT EXISTS (SELECT FROM run_waitpoints AS w WHERE w.waitpoint_id = r.id AND w.completed_at IS NULL)
          -- (the batch that created it, and any holding it as a cached item)
          AND NOT EXISTS (SELECT FROM batches AS b
                          WHERE b.id = r.batch_id AND b.status IN ('PENDING', 'PROCESSING'))
          AND NOT EXISTS (SELECT FROM batch_items AS i JOIN batches AS b ON b.id = i.batch_id
                          WHERE i.run_id = r.id AND b.status IN ('PENDING', 'PROCESSING'))
        ORDER BY r.updated_at
        LIMIT n
        FOR UPDATE OF r SKIP LOCKED) AS r;
  purged := coalesce(cardinality(ids), 0);
  IF purged > 0 THEN
    DELETE FROM run_waitpoints AS w WHERE w.run_id = ANY (ids);
    DELETE FROM attempts AS a WHERE a.run_id = ANY (ids);
    DELETE FROM checkpoints AS k WHERE k.run_id = ANY (ids);
    DELETE FROM runs AS r WHERE r.id = ANY (ids);
  END IF;
  -- Finished batches with no run left.
  DELETE FROM batch_items AS i
  USING (SELECT b.id FROM batches AS b
         WHERE b.status IN ('COMPLETED', 'ABORTED') AND b.updated_at < cutoff
           AND NOT EXISTS (SELECT FROM runs AS r WHERE r.batch_id = b.id)
         LIMIT n FOR UPDATE SKIP LOCKED) AS gone
  WHERE i.batch_id = gone.id;
  DELETE FROM batches AS b
  WHERE b.id IN (SELECT x.id FROM batches AS x
                 WHERE x.status IN ('COMPLETED', 'ABORTED') AND x.updated_at < cutoff
                   AND NOT EXISTS (SELECT FROM runs AS r WHERE r.batch_id = x.id)
                   AND NOT EXISTS (SELECT FROM batch_items AS i WHERE i.batch_id = x.id)
                 LIMIT n FOR UPDATE SKIP LOCKED);
  RETURN purged;
END
$$;
