-- Operational figures of one store (SPEC §4 [1.2], metrics), for `runops metrics` and its
-- Prometheus endpoint (docs/operations.md).
--
--   metrics(environment_id)  this store's figures as jsonb; each store answers for itself
--                            (no FDW hop), so a scrape of one store never waits on the other
--
-- What it reads, and what that costs:
--   runs            per environment and status: a full count of this store's runs (a sequential
--                   scan; acceptable for a scrape every 15 s or more) — with an environment given,
--                   only that environment's runs through runs_environment_created_idx
--   queues          PENDING runs per environment and the oldest one's age: runs_queue_idx
--   lapsed_leases   DEQUEUED/EXECUTING runs whose lease ran out (tick puts them back to PENDING):
--                   runs_active_idx, whose predicate is exactly that status set
--   open_batches    PENDING (open) and PROCESSING (sealed, unfinished) batches: a scan of
--                   batches filtered by status (batches_seal_idx covers only the PENDING ones)
--   claims          the idempotency claim ledger's rows, on the run-ops store (its home; the
--                   control plane's copy stays empty and reports null); the primary key's
--                   leading environment_id answers the per-environment count
--   alerts          this store's alert outbox: pending (not yet delivered, due or waiting for a
--                   retry or held by a deliverer), failed (given up), and the age of the oldest
--                   pending one since it was written (alerts_due_idx; alerts_failed_idx)
--   mirror          run-ops only: how the tenant mirror is fed and how fresh it is. Under logical
--                   replication, pg_stat_subscription's latest_end_time is when the control
--                   plane last confirmed a WAL position to the subscription; lag_seconds is the
--                   time since, an upper bound on how stale the mirror can be while the worker
--                   streams (an idle control plane confirms on its keepalives). Under the pull
--                   engine (tick pulls through the FDW) there is no cheap honest figure: null.
-- Ages are measured with runops.now(), in this store.

CREATE OR REPLACE FUNCTION runops.metrics(environment_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  env_id text := metrics.environment_id;
  at timestamptz := now();
  role text;
  by_status jsonb;
  queues jsonb;
  lapsed bigint;
  open_batches bigint;
  claims bigint;
  alerts_figures jsonb;
  mirror jsonb;
  sub record;
BEGIN
  IF env_id = '' THEN
    PERFORM raise_error('RO006', 'environment_id must not be empty (omit it, or pass NULL, for every environment)');
  END IF;
  IF octet_length(env_id) > 255 THEN
    PERFORM raise_error('RO006', 'environment_id is too long: ' || input_prefix(env_id));
  END IF;
  role := store_role();

  -- Runs per environment and status. Without an environment: a full count of this store's runs
  -- (a sequential scan, on purpose); with one, its runs only (runs_environment_created_idx). Two
  -- statements, so that neither plan has to serve both cases.
  IF env_id IS NULL THEN
    SELECT coalesce(jsonb_object_agg(e.environment_id, e.statuses), '{}') INTO by_status
    FROM (SELECT c.environment_id, jsonb_object_agg(c.status, c.n) AS statuses
          FROM (SELECT r.environment_id, r.status, count(*) AS n
                FROM runs AS r
                GROUP BY r.environment_id, r.status) AS c
          GROUP BY c.environment_id) AS e;
  ELSE
    SELECT coalesce(jsonb_build_object(env_id, jsonb_object_agg(c.status, c.n)), '{}') INTO by_status
    FROM (SELECT r.status, count(*) AS n
          FROM runs AS r
          WHERE r.environment_id = env_id
          GROUP BY r.status) AS c
    HAVING count(*) > 0;
    by_status := coalesce(by_status, '{}');
  END IF;

  -- Queue depth and the oldest pending age (runs_queue_idx: PENDING runs by environment, queued_at).
  SELECT coalesce(jsonb_object_agg(q.environment_id, jsonb_build_object(
           'depth', q.depth,
           'oldest_pending_seconds', round(greatest(extract(epoch FROM at - q.oldest), 0)::numeric, 3))), '{}')
  INTO queues
  FROM (SELECT r.environment_id, count(*) AS depth, min(r.queued_at) AS oldest
        FROM runs AS r
        WHERE r.status = 'PENDING' AND (env_id IS NULL OR r.environment_id = env_id)
        GROUP BY r.environment_id) AS q;

  -- Leases that ran out (runs_active_idx).
  SELECT count(*) INTO lapsed
  FROM runs AS r
  WHERE r.status IN ('DEQUEUED', 'EXECUTING') AND r.lease_expires_at < at
    AND (env_id IS NULL OR r.environment_id = env_id);

  SELECT count(*) INTO open_batches
  FROM batches AS b
  WHERE b.status IN ('PENDING', 'PROCESSING') AND (env_id IS NULL OR b.environment_id = env_id);

  SELECT jsonb_build_object(
           'pending', p.n,
           'oldest_pending_seconds', CASE WHEN p.n > 0 THEN round(greatest(extract(epoch FROM at - p.oldest), 0)::numeric, 3) END,
           'failed', (SELECT count(*) FROM alerts AS f
                      WHERE f.status = 'FAILED' AND (env_id IS NULL OR f.environment_id = env_id)))
  INTO alerts_figures
  FROM (SELECT count(*) AS n, min(a.created_at) AS oldest FROM alerts AS a
        WHERE a.status = 'PENDING' AND (env_id IS NULL OR a.environment_id = env_id)) AS p;

  IF role = 'RUN_OPS' THEN
    SELECT count(*) INTO claims
    FROM idempotency_claims AS c
    WHERE env_id IS NULL OR c.environment_id = env_id;

    SELECT s.subenabled AS enabled, st.pid AS pid, st.latest_end_time, st.last_msg_receipt_time
    INTO sub
    FROM pg_subscription AS s
    LEFT JOIN pg_stat_subscription AS st ON st.subid = s.oid AND st.relid IS NULL
    WHERE s.subname = 'runops_mirror'
      AND s.subdbid = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database());
    IF FOUND THEN
      mirror := jsonb_build_object(
        'engine', 'subscription',
        'enabled', sub.enabled,
        'streaming', sub.pid IS NOT NULL,
        'latest_end_time', sub.latest_end_time,
        'last_msg_receipt_time', sub.last_msg_receipt_time,
        'lag_seconds', round(greatest(extract(epoch FROM at - sub.latest_end_time), 0)::numeric, 3));
    ELSE
      mirror := jsonb_build_object(
        'engine', CASE WHEN peer_wired() THEN 'pull' ELSE 'none' END,
        'enabled', NULL, 'streaming', NULL, 'latest_end_time', NULL, 'last_msg_receipt_time', NULL,
        'lag_seconds', NULL);
    END IF;
    -- The freshness figures (state, age_seconds, bound_seconds, fresh) come from mirror_status.
    mirror := mirror_status() || mirror || jsonb_build_object(
      'split_settings_updated_at', (SELECT s.updated_at FROM split_settings AS s));
  END IF;

  RETURN jsonb_build_object(
    'store_role', role,
    'environment_id', env_id,
    'measured_at', at,
    'runs', by_status,
    'queues', queues,
    'lapsed_leases', lapsed,
    'open_batches', open_batches,
    'claims', claims,
    'alerts', alerts_figures,
    'mirror', mirror);
END
$$;
