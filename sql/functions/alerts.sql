-- Alerts (SPEC §9 [1.3]): channels, the outbox, and the deliverers' claim/complete/fail.
--
--   create_alert_channel   control plane: a WEBHOOK channel of an environment (mirrored to run-ops)
--   delete_alert_channel   control plane: retires a channel (deleted_at; the mirror follows)
--   write_run_alerts       the outbox trigger: a run turning final writes one alert per live
--                          channel of its environment whose events name the status, in the same
--                          transaction, on the run's own store
--   claim_alerts           a deliverer leases due alerts (of one environment, or all) (FOR UPDATE SKIP LOCKED; a lapsed lease
--                          is due again) and gets each one's body; an alert whose channel, run
--                          or environment cannot be read here is a failed attempt, never handed out
--   complete_alert         the deliverer holding the lease marks it DELIVERED
--   fail_alert             the deliverer holding the lease records a failed delivery: due again
--                          after alert_retry_delay, or FAILED once its attempts are used up
-- The tables: sql/schema/55_alerts.sql. Defaults (lease, attempts, backoff): defaults.sql.
-- Delivery itself (HTTP, signatures) is the client's: py_client/runops/alerts.py.

-- The final statuses a channel alerts on when its options name none: every final status but
-- the two that are nobody's problem.
CREATE OR REPLACE FUNCTION runops.default_alert_events()
RETURNS text[]
LANGUAGE sql STABLE
AS $$
  SELECT ARRAY(SELECT s.status FROM runops.run_statuses AS s
               WHERE s.is_final AND s.status NOT IN ('COMPLETED_SUCCESSFULLY', 'CANCELED')
               ORDER BY s.status)
$$;

-- A channel's events option: a non-empty array of final statuses (runops.run_statuses), sorted
-- and without repeats; the default when not given.
CREATE OR REPLACE FUNCTION runops.option_alert_events(options jsonb)
RETURNS text[]
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  given text[] := option_text_array(options, 'events');
  wrong text;
BEGIN
  IF given IS NULL THEN
    RETURN default_alert_events();
  END IF;
  SELECT g INTO wrong FROM unnest(given) AS g
  WHERE NOT EXISTS (SELECT FROM run_statuses AS s WHERE s.status = g AND s.is_final) LIMIT 1;
  IF FOUND THEN
    PERFORM raise_invalid('option events', 'final run statuses ('
                          || (SELECT string_agg(s.status, ', ' ORDER BY s.status) FROM run_statuses AS s WHERE s.is_final)
                          || ')', quote_nullable(input_prefix(wrong)));
  END IF;
  RETURN ARRAY(SELECT DISTINCT g FROM unnest(given) AS g ORDER BY g);
END
$$;

-- An http(s) URL with a host, at most 2048 bytes, no whitespace or control characters.
CREATE OR REPLACE FUNCTION runops.require_webhook_target(target text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF target IS NULL OR target !~* '^https?://[^/?#[:space:][:cntrl:]]+([/?#][^[:space:][:cntrl:]]*)?$'
     OR octet_length(target) > 2048 THEN
    PERFORM raise_invalid('target', 'an http:// or https:// URL of at most 2048 bytes',
                          quote_nullable(input_prefix(target)));
  END IF;
  RETURN target;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_alert_channel(environment_id text, kind text, target text,
                                                       options jsonb DEFAULT '{}')
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  opts jsonb := require_object(options, 'options');
  events text[];
  secret text;
  enabled boolean;
  new_id text := generate_cuid();
BEGIN
  PERFORM reject_unknown_options(opts, ARRAY['events', 'secret', 'enabled'], 'alert channel');
  IF create_alert_channel.kind IS DISTINCT FROM 'WEBHOOK' THEN
    PERFORM raise_invalid('kind', 'WEBHOOK', quote_nullable(input_prefix(create_alert_channel.kind)));
  END IF;
  PERFORM require_webhook_target(create_alert_channel.target);
  events := option_alert_events(opts);
  secret := option_text(opts, 'secret', 1024);
  IF secret = '' THEN
    PERFORM raise_invalid('option secret', 'a non-empty string');
  END IF;
  enabled := coalesce(option_boolean(opts, 'enabled'), true);
  IF create_alert_channel.environment_id IS NULL OR create_alert_channel.environment_id = '' THEN
    PERFORM raise_error('RO006', 'environment_id is required');
  END IF;
  PERFORM require_control_plane('create_alert_channel');
  IF NOT EXISTS (SELECT FROM runtime_environments AS e WHERE e.id = create_alert_channel.environment_id) THEN
    PERFORM raise_error('RO004', format('environment %s not found',
                                        quote_literal(input_prefix(create_alert_channel.environment_id))));
  END IF;
  INSERT INTO alert_channels (id, environment_id, kind, target, events, secret, enabled, created_at, updated_at)
  VALUES (new_id, create_alert_channel.environment_id, 'WEBHOOK', create_alert_channel.target, events, secret,
          enabled, now(), now());
  RETURN 'alertchannel_' || new_id;
END
$$;

CREATE OR REPLACE FUNCTION runops.delete_alert_channel(channel_id text)
RETURNS SETOF runops.alert_channel_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text := require_id(delete_alert_channel.channel_id, 'alertchannel', 'channel_id');
BEGIN
  PERFORM require_control_plane('delete_alert_channel');
  RETURN QUERY
  UPDATE alert_channels AS c SET deleted_at = now(), updated_at = now()
  WHERE c.id = bare AND c.deleted_at IS NULL
  RETURNING 'alertchannel_' || c.id, c.environment_id::text, c.kind, c.target, c.events, c.enabled,
            c.created_at, c.deleted_at;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('alert channel %s not found', input_prefix(delete_alert_channel.channel_id)));
  END IF;
END
$$;

-- The outbox. Fires only for a move into a final status (the triggers' WHEN), so every other
-- transition pays nothing; a final move with no live channel in its environment pays one probe
-- of alert_channels_live_idx. Names are qualified and no search_path is set: a SET clause would
-- cost every final move a configuration save and restore.
CREATE OR REPLACE FUNCTION runops.write_run_alerts()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
  IF EXISTS (SELECT FROM runops.alert_channels AS c
             WHERE c.environment_id = NEW.environment_id AND c.enabled AND c.deleted_at IS NULL) THEN
    INSERT INTO runops.alerts (id, channel_id, environment_id, run_id, run_status, next_attempt_at,
                               created_at, updated_at)
    SELECT runops.mint_id(), c.id, NEW.environment_id, NEW.id, NEW.status, n.at, n.at, n.at
    FROM runops.alert_channels AS c, (SELECT runops.now() AS at) AS n
    WHERE c.environment_id = NEW.environment_id AND c.enabled AND c.deleted_at IS NULL
      AND NEW.status = ANY (c.events);
  END IF;
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER runs_alert_outbox
  AFTER UPDATE OF status ON runops.runs
  FOR EACH ROW
  WHEN (runops.is_final_status(NEW.status) AND NOT runops.is_final_status(OLD.status))
  EXECUTE FUNCTION runops.write_run_alerts();

-- A run born final (trigger_failed_task: SYSTEM_FAILURE) alerts as well.
CREATE OR REPLACE TRIGGER runs_alert_outbox_born_final
  AFTER INSERT ON runops.runs
  FOR EACH ROW
  WHEN (runops.is_final_status(NEW.status))
  EXECUTE FUNCTION runops.write_run_alerts();

-- What a receiver gets: the alert, the run and its environment, read at claim time from this
-- store (the run is final, so it no longer changes).
CREATE OR REPLACE FUNCTION runops.alert_body(alert_id text, channel_id text, created_at timestamptz, run_status text,
                                             r runops.runs, e runops.runtime_environments)
RETURNS jsonb
LANGUAGE sql STABLE
AS $$
  SELECT jsonb_build_object(
    'alert_id', 'alert_' || alert_id,
    'type', 'run.final',
    'created_at', created_at,
    'channel_id', 'alertchannel_' || channel_id,
    'run', jsonb_build_object(
      'id', 'run_' || r.id,
      'task_identifier', r.task_identifier,
      'status', run_status,
      'error', r.error,
      'attempt_number', r.attempt_number,
      'tags', to_jsonb(r.tags),
      'idempotency_key', r.idempotency_key,
      'parent_run_id', 'run_' || r.parent_run_id,
      'root_run_id', 'run_' || r.root_run_id,
      'batch_id', 'batch_' || r.batch_id,
      'created_at', r.created_at,
      'completed_at', r.completed_at),
    'environment', jsonb_build_object(
      'id', e.id,
      'slug', e.slug,
      'type', e.type,
      'project_id', e.project_id,
      'organization_id', e.organization_id))
$$;

CREATE OR REPLACE FUNCTION runops.claim_alerts(worker_id text, max_rows integer, options jsonb DEFAULT '{}')
RETURNS TABLE (alert_id text, channel_id text, kind text, target text, environment_id text, run_id text,
               run_status text, body jsonb, attempt integer, secret text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  opts jsonb := require_object(options, 'options');
  lease interval;
  at timestamptz := now();
  worker text := require_worker(claim_alerts.worker_id);
  most integer := default_alert_max_attempts();
  env text;
BEGIN
  PERFORM reject_unknown_options(opts, ARRAY['lease', 'environment_id'], 'claim_alerts');
  env := option_text(opts, 'environment_id', 255);
  PERFORM require_between(max_rows, 1, 1000, 'max_rows');
  lease := option_duration(opts, 'lease', default_alert_lease());
  IF lease < interval '1 second' THEN
    PERFORM raise_error('RO006', 'option lease must be at least 1s');
  END IF;
  -- Every due alert taken is one attempt. One whose channel (deleted, disabled), run (purged) or
  -- environment cannot be read here is not handed out: the attempt fails with the reason, and
  -- it is due again after the backoff (the mirror may catch up, the channel be re-enabled), or
  -- FAILED once its attempts are used up — never DELIVERED. So is one whose last lease lapsed
  -- on its last attempt.
  RETURN QUERY
  WITH due AS (
    SELECT a.* FROM alerts AS a
    WHERE a.status = 'PENDING' AND a.next_attempt_at <= at AND (env IS NULL OR a.environment_id = env)
    ORDER BY a.next_attempt_at
    LIMIT max_rows
    FOR UPDATE SKIP LOCKED
  ), judged AS (
    SELECT d.id, c.kind AS c_kind, c.target AS c_target, c.secret AS c_secret,
           CASE WHEN d.attempt >= most THEN 'the lease lapsed on the last attempt'
                WHEN c.id IS NULL THEN 'alert channel alertchannel_' || d.channel_id || ' is deleted or unknown here'
                WHEN NOT c.enabled THEN 'alert channel alertchannel_' || d.channel_id || ' is disabled'
                WHEN r.id IS NULL THEN 'run run_' || d.run_id || ' cannot be read on this store'
                WHEN e.id IS NULL THEN 'environment ' || d.environment_id || ' cannot be read on this store'
           END AS problem,
           CASE WHEN r.id IS NOT NULL AND e.id IS NOT NULL THEN alert_body(d.id, d.channel_id, d.created_at, d.run_status, r, e) END AS c_body
    FROM due AS d
    LEFT JOIN alert_channels AS c ON c.id = d.channel_id AND c.deleted_at IS NULL
    LEFT JOIN runs AS r ON r.id = d.run_id
    LEFT JOIN runtime_environments AS e ON e.id = d.environment_id
  ), taken AS (
    UPDATE alerts AS a
    SET attempt = a.attempt + CASE WHEN j.problem IS NOT NULL AND a.attempt >= most THEN 0 ELSE 1 END,
        status = CASE WHEN j.problem IS NOT NULL AND a.attempt + 1 >= most THEN 'FAILED' ELSE 'PENDING' END,
        leased_by = CASE WHEN j.problem IS NULL THEN worker END,
        next_attempt_at = CASE WHEN j.problem IS NULL THEN at + lease
                               ELSE at + alert_retry_delay(a.attempt + 1) END,
        last_error = coalesce(j.problem, a.last_error),
        completed_at = CASE WHEN j.problem IS NOT NULL AND a.attempt + 1 >= most THEN at END,
        updated_at = at
    FROM judged AS j
    WHERE a.id = j.id
    RETURNING a.id, a.channel_id, a.environment_id, a.run_id, a.run_status, a.attempt, a.next_attempt_at,
              j.problem, j.c_kind, j.c_target, j.c_secret, j.c_body
  )
  SELECT 'alert_' || t.id, 'alertchannel_' || t.channel_id, t.c_kind, t.c_target, t.environment_id::text,
         'run_' || t.run_id, t.run_status, t.c_body, t.attempt, t.c_secret
  FROM taken AS t
  WHERE t.problem IS NULL
  ORDER BY t.next_attempt_at, t.id;
END
$$;

-- The alert a deliverer reports on, locked: RO006/RO001 for a bad id, RO002 for the other
-- store's, RO004 when missing, RO003 unless it is PENDING and leased to this worker (a lapsed
-- lease nobody took since still counts: the report is true). Returns NULL when the same worker
-- reports again what it already reported (a retried call).
CREATE OR REPLACE FUNCTION runops.lock_leased_alert(alert_id text, worker_id text, already text)
RETURNS runops.alerts
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  bare text := require_local_id(alert_id, 'alert', 'alert');
  worker text := require_worker(worker_id);
  a runops.alerts;
BEGIN
  SELECT * INTO a FROM alerts AS x WHERE x.id = bare FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('alert %s not found', input_prefix(alert_id)));
  END IF;
  IF a.status = already AND a.leased_by = worker THEN
    RETURN NULL;
  END IF;
  IF a.status <> 'PENDING' OR a.leased_by IS DISTINCT FROM worker THEN
    PERFORM raise_error('RO003',
      format('alert alert_%s is not leased to worker %s (it is %s%s)', a.id, quote_literal(input_prefix(worker)),
             a.status, coalesce(', leased to ' || quote_literal(a.leased_by), '')),
      NULL, 'claim it again with claim_alerts');
  END IF;
  RETURN a;
END
$$;

CREATE OR REPLACE FUNCTION runops.complete_alert(alert_id text, worker_id text)
RETURNS SETOF runops.alert_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  a alerts := lock_leased_alert(complete_alert.alert_id, complete_alert.worker_id, 'DELIVERED');
  bare text := bare_id(complete_alert.alert_id, 'alert');
BEGIN
  IF a.id IS NOT NULL THEN
    UPDATE alerts AS x SET status = 'DELIVERED', completed_at = now(), updated_at = now()
    WHERE x.id = a.id;
  END IF;
  RETURN QUERY SELECT 'alert_' || x.id, x.status, x.attempt, x.next_attempt_at, x.last_error, x.completed_at
               FROM alerts AS x WHERE x.id = bare;
END
$$;

CREATE OR REPLACE FUNCTION runops.fail_alert(alert_id text, worker_id text, error text)
RETURNS SETOF runops.alert_state
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  a alerts;
  bare text;
  at timestamptz := now();
BEGIN
  IF fail_alert.error IS NULL OR fail_alert.error = '' OR length(fail_alert.error) > 4000 THEN
    PERFORM raise_invalid('error', 'a description of 1 to 4000 characters',
                          CASE WHEN fail_alert.error IS NULL THEN 'NULL' ELSE length(fail_alert.error) || ' characters' END);
  END IF;
  a := lock_leased_alert(fail_alert.alert_id, fail_alert.worker_id, 'FAILED');
  bare := bare_id(fail_alert.alert_id, 'alert');
  IF a.id IS NOT NULL THEN
    UPDATE alerts AS x
    SET status = CASE WHEN x.attempt >= default_alert_max_attempts() THEN 'FAILED' ELSE 'PENDING' END,
        next_attempt_at = at + alert_retry_delay(x.attempt),
        completed_at = CASE WHEN x.attempt >= default_alert_max_attempts() THEN at END,
        last_error = fail_alert.error,
        updated_at = at
    WHERE x.id = a.id;
  END IF;
  RETURN QUERY SELECT 'alert_' || x.id, x.status, x.attempt, x.next_attempt_at, x.last_error, x.completed_at
               FROM alerts AS x WHERE x.id = bare;
END
$$;
