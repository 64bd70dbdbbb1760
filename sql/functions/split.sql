-- Split control and residency decisions.
--
-- split_settings lives on the control plane and reaches run-ops through the mirror. A root run's
-- residency follows it (rule 3); children, batches and items follow their anchor (rule 2); a
-- pre-minted id must agree with both (rule 1).

-- Rule 3: the residency a root run (or parentless batch, or standalone token) mints with.
CREATE OR REPLACE FUNCTION runops.root_residency(env runops.environment_context)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT CASE
           WHEN NOT env.split_enabled THEN 'LEGACY'
           WHEN coalesce(env.mint_kind, env.default_mint_kind) = 'ksuid' THEN 'NEW'
           ELSE 'LEGACY'
         END
$$;

-- Rules 1 and 2: the residency the anchors of a trigger (parent, batch) impose, or NULL for a
-- root. RO001 for an unclassifiable anchor, RO004 for a NEW anchor while the split was never
-- enabled, RO006 for a pre-minted KSUID then.
CREATE OR REPLACE FUNCTION runops.anchor_residency(spec runops.trigger_spec)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  residency text;
BEGIN
  IF spec.parent_run_id IS NOT NULL THEN
    residency := classify_bare(spec.parent_run_id);
    IF residency = 'NEW' AND NOT (current_split_settings()).ever_enabled THEN
      PERFORM raise_error('RO004', format('parent run run_%s not found (the split was never enabled)', spec.parent_run_id));
    END IF;
  ELSIF spec.batch_id IS NOT NULL THEN
    residency := classify_bare(spec.batch_id);
    IF residency = 'NEW' AND NOT (current_split_settings()).ever_enabled THEN
      PERFORM raise_error('RO004', format('batch batch_%s not found (the split was never enabled)', spec.batch_id));
    END IF;
  END IF;
  IF spec.run_id IS NOT NULL AND classify_bare(spec.run_id) = 'NEW'
     AND NOT (current_split_settings()).ever_enabled THEN
    PERFORM raise_error('RO006', format('pre-minted run id run_%s is a KSUID, but the split was never enabled', spec.run_id),
                        NULL, 'mint run ids with the id shape trigger_route reports, or omit run_id');
  END IF;
  RETURN residency;
END
$$;

-- Which store a trigger with these (parsed) options belongs on, given its environment (loaded
-- once by the caller). Raises as anchor_residency does, RO004 for a root in a missing
-- environment, and RO006 for a pre-minted id that disagrees with the rules — unless that run
-- exists: a retry across a mint-kind flip gets its cached run, in the id's store.
CREATE OR REPLACE FUNCTION runops.decide_residency(env runops.environment_context, environment_id text,
                                                   spec runops.trigger_spec)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  residency text := anchor_residency(spec);
  preminted text;
BEGIN
  IF residency IS NULL THEN
    IF env.id IS NULL THEN
      PERFORM raise_error('RO004', format('environment %s not found', quote_nullable(input_prefix(environment_id))));
    END IF;
    residency := root_residency(env);
  END IF;
  IF spec.run_id IS NOT NULL THEN
    preminted := classify_bare(spec.run_id);
    IF preminted <> residency AND NOT run_exists(spec.run_id) THEN
      PERFORM raise_error('RO006', format('pre-minted run id run_%s is %s, but this run must be %s', spec.run_id,
                                           preminted, residency),
                          NULL, 'mint run ids with the id shape trigger_route reports, or omit run_id');
    END IF;
    residency := preminted;
    IF residency = 'NEW' AND local_residency() = 'NEW' THEN
      PERFORM refuse_other_shard(spec.run_id, 'run', 'run_' || spec.run_id);  -- shards.sql
    END IF;
  END IF;
  RETURN residency;
END
$$;

-- Whether a run with this bare id exists, in whichever store its shape names (cold path: only
-- asked when a pre-minted id disagrees with the minting rules).
CREATE OR REPLACE FUNCTION runops.run_exists(run_id text)
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  residency text := try_classify_bare(run_id);
BEGIN
  IF residency = local_residency() THEN
    RETURN EXISTS (SELECT FROM runs AS r WHERE r.id = run_exists.run_id);
  END IF;
  IF residency IS NULL OR NOT peer_wired() THEN
    RETURN false;
  END IF;
  RETURN EXISTS (SELECT FROM runops_peer.runs AS r WHERE r.id = run_exists.run_id);
EXCEPTION WHEN connection_exception THEN
  PERFORM raise_error('RO009', 'the other store is unavailable: ' || SQLERRM);
  RETURN false;
END
$$;

CREATE OR REPLACE FUNCTION runops.trigger_route(environment_id text, options jsonb DEFAULT '{}')
RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  RETURN store_for_residency(decide_residency(load_environment(trigger_route.environment_id),
                                              trigger_route.environment_id,
                                              parse_trigger_options(trigger_route.options)));
END
$$;

-- The other store's identity, read through the FDW.
CREATE OR REPLACE FUNCTION runops.peer_identity()
RETURNS TABLE (system_identifier text, database_name text, database_oid bigint, store_role text,
               server_version text)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  IF peer_wired() THEN
    RETURN QUERY SELECT i.system_identifier, i.database_name, i.database_oid, i.store_role, i.server_version
                 FROM runops_peer.store_identity_view AS i;
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION runops.identity_json(system_identifier text, database_name text,
                                                database_oid bigint, store_role text, server_version text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
  SELECT jsonb_build_object('system_identifier', system_identifier, 'database_name', database_name,
                            'database_oid', database_oid, 'store_role', store_role,
                            'server_version', server_version)
$$;

-- Compares this control plane with what its FDW reaches and with what that store's FDW reaches
-- back. Returns {distinct, same_cluster, reason, control_plane, run_ops, run_ops_sees}; never
-- raises for a failed probe (the verdict says so), so split_status can report it.
CREATE OR REPLACE FUNCTION runops.probe_split()
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  mine jsonb;
  theirs jsonb;
  back jsonb;
BEGIN
  SELECT identity_json(i.system_identifier, i.database_name, i.database_oid, i.store_role, i.server_version)
  INTO mine FROM store_identity() AS i;
  IF NOT peer_wired() THEN
    RETURN jsonb_build_object('distinct', false, 'same_cluster', false, 'control_plane', mine,
                              'run_ops', NULL, 'reason', 'no run-ops store is wired (run `runops migrate` with both URLs)');
  END IF;
  BEGIN
    SELECT identity_json(i.system_identifier, i.database_name, i.database_oid, i.store_role, i.server_version)
    INTO theirs FROM runops_peer.store_identity_view AS i;
    SELECT identity_json(i.system_identifier, i.database_name, i.database_oid, i.store_role, i.server_version)
    INTO back FROM runops_peer.peer_identity_view AS i;
  EXCEPTION WHEN OTHERS THEN
    RETURN jsonb_build_object('distinct', false, 'same_cluster', false, 'control_plane', mine, 'run_ops', NULL,
                              'reason', 'the run-ops probe failed: ' || SQLERRM);
  END;
  IF theirs IS NULL THEN
    RETURN jsonb_build_object('distinct', false, 'same_cluster', false, 'control_plane', mine, 'run_ops', NULL,
                              'reason', 'the run-ops probe returned no identity');
  END IF;
  IF theirs ->> 'system_identifier' = mine ->> 'system_identifier'
     AND theirs ->> 'database_name' = mine ->> 'database_name' THEN
    RETURN jsonb_build_object('distinct', false, 'same_cluster', true, 'control_plane', mine, 'run_ops', theirs,
                              'reason', 'the run-ops store is the same physical database as the control plane '
                                        '(same system identifier and database; a replica or clone counts as the same)');
  END IF;
  IF theirs ->> 'store_role' IS DISTINCT FROM 'RUN_OPS' THEN
    RETURN jsonb_build_object('distinct', false, 'same_cluster', false, 'control_plane', mine, 'run_ops', theirs,
                              'reason', 'the FDW target is not a run-ops store (store_role '
                                        || coalesce(theirs ->> 'store_role', 'unset') || ')');
  END IF;
  IF back IS NULL OR back ->> 'system_identifier' <> mine ->> 'system_identifier'
     OR back ->> 'database_name' <> mine ->> 'database_name' THEN
    RETURN jsonb_build_object('distinct', false, 'same_cluster', false, 'control_plane', mine, 'run_ops', theirs,
                              'run_ops_sees', back,
                              'reason', 'the run-ops store''s FDW does not point back at this control plane');
  END IF;
  RETURN jsonb_build_object('distinct', true,
                            'same_cluster', theirs ->> 'system_identifier' = mine ->> 'system_identifier',
                            'control_plane', mine, 'run_ops', theirs, 'run_ops_sees', back,
                            'reason', CASE WHEN theirs ->> 'system_identifier' = mine ->> 'system_identifier'
                                           THEN 'distinct database in the same cluster (allowed; a separate cluster is recommended)'
                                           ELSE 'distinct clusters' END);
END
$$;

CREATE OR REPLACE FUNCTION runops.split_status()
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  s split_settings := current_split_settings();
  probe jsonb;
BEGIN
  PERFORM require_control_plane('split_status');
  probe := probe_split();
  RETURN jsonb_build_object(
    'enabled', s.enabled,
    'ever_enabled', s.ever_enabled,
    'distinct', probe -> 'distinct',
    'reason', probe -> 'reason',
    'control_plane', probe -> 'control_plane',
    'run_ops', probe -> 'run_ops',
    'default_mint_kind', s.default_mint_kind,
    'org_mint_kinds', coalesce((SELECT jsonb_object_agg(o.id, o.mint_kind ORDER BY o.id)
                                FROM organizations AS o WHERE o.mint_kind IS NOT NULL), '{}'::jsonb));
END
$$;

-- Fails closed: any doubt that the run-ops store is a separate database refuses with RO007.
CREATE OR REPLACE FUNCTION runops.enable_split()
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  probe jsonb;
BEGIN
  PERFORM require_control_plane('enable_split');
  probe := probe_split();
  IF NOT (probe ->> 'distinct')::boolean THEN
    -- The refusal cannot be audited in split_audit (this transaction rolls back); it is in the
    -- server log as this error, with its DETAIL.
    PERFORM raise_error('RO007', 'split refused: ' || (probe ->> 'reason'), probe::text,
                        'initialise a fresh run-ops database and wire it with `runops migrate`');
  END IF;
  IF (probe ->> 'same_cluster')::boolean THEN
    RAISE WARNING 'the run-ops store is another database of the control plane''s cluster; a separate cluster is recommended';
  END IF;
  -- The first enable claims every live key of this store in the ledger (SPEC §6), holding the
  -- gate that keyed triggers pass through (lock_key_claim), so no unclaimed key slips past.
  PERFORM pg_advisory_xact_lock(1919250031, 1);
  IF NOT (current_split_settings()).ever_enabled THEN
    probe := probe || jsonb_build_object('claims_backfilled', backfill_claims());
  END IF;
  UPDATE split_settings
  SET enabled = true, ever_enabled = true, updated_at = now(),
      claims_backfilled_at = CASE WHEN ever_enabled THEN claims_backfilled_at ELSE now() END;
  INSERT INTO split_audit (actor, action, verdict, detail)
  VALUES (session_user, 'enable_split',
          CASE WHEN (probe ->> 'same_cluster')::boolean THEN 'ACCEPTED_WITH_WARNING' ELSE 'ACCEPTED' END, probe);
  RETURN split_status();
END
$$;

CREATE OR REPLACE FUNCTION runops.disable_split()
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM require_control_plane('disable_split');
  UPDATE split_settings SET enabled = false, updated_at = now();
  INSERT INTO split_audit (actor, action, verdict, detail)
  VALUES (session_user, 'disable_split', 'ACCEPTED', '{}');
  RETURN split_status();
END
$$;

CREATE OR REPLACE FUNCTION runops.require_mint_kind(kind text, allow_default boolean)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF kind IS NULL OR kind NOT IN ('cuid', 'ksuid') AND NOT (allow_default AND kind = 'default') THEN
    PERFORM raise_invalid('mint kind', 'cuid or ksuid' || CASE WHEN allow_default
                                                               THEN ' (or default, to follow the default)' ELSE '' END,
                          quote_nullable(input_prefix(kind)));
  END IF;
  RETURN nullif(kind, 'default');
END
$$;

-- kind 'default' clears the organization's override.
CREATE OR REPLACE FUNCTION runops.set_mint_kind(organization_id text, kind text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  new_kind text := require_mint_kind(kind, true);
BEGIN
  PERFORM require_control_plane('set_mint_kind');
  UPDATE organizations AS o SET mint_kind = new_kind, updated_at = now()
  WHERE o.id = set_mint_kind.organization_id;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('organization %s not found', input_prefix(set_mint_kind.organization_id)));
  END IF;
  INSERT INTO split_audit (actor, action, verdict, detail)
  VALUES (session_user, 'set_mint_kind', 'ACCEPTED',
          jsonb_build_object('organization_id', set_mint_kind.organization_id, 'kind', new_kind));
END
$$;

CREATE OR REPLACE FUNCTION runops.set_default_mint_kind(kind text)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  new_kind text := require_mint_kind(kind, false);
BEGIN
  PERFORM require_control_plane('set_default_mint_kind');
  UPDATE split_settings SET default_mint_kind = new_kind, updated_at = now();
  INSERT INTO split_audit (actor, action, verdict, detail)
  VALUES (session_user, 'set_default_mint_kind', 'ACCEPTED', jsonb_build_object('kind', new_kind));
END
$$;
