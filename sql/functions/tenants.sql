-- Tenants: organizations, projects, runtime environments. Their home is the control plane; the
-- run-ops store answers from its mirror, and on a mirror miss asks the control plane through
-- the FDW before saying "not found" (a freshly created environment may not have replicated yet).

-- Tenant and split-control functions exist in both stores but act only on the control plane.
CREATE OR REPLACE FUNCTION runops.require_control_plane(what text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF local_residency() <> 'LEGACY' THEN
    PERFORM raise_wrong_store(what, '(control-plane setting)', 'CONTROL_PLANE');
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION runops.require_slug(slug text, what text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF slug IS NULL OR slug !~ '^[a-z0-9][a-z0-9-]{0,62}$' THEN
    PERFORM raise_error('RO006', format('%s slug must be 1-63 lower-case letters, digits or dashes, got %s',
                                         what, quote_nullable(input_prefix(slug))));
  END IF;
  RETURN slug;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_organization(slug text, options jsonb DEFAULT '{}')
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  opts jsonb := require_object(options, 'options');
  kind text;
  new_id text := generate_cuid();
BEGIN
  PERFORM require_slug(create_organization.slug, 'organization');
  PERFORM reject_unknown_options(opts, ARRAY['title', 'mint_kind'], 'organization');
  kind := option_text(opts, 'mint_kind');
  IF kind IS NOT NULL AND kind NOT IN ('cuid', 'ksuid') THEN
    PERFORM raise_error('RO006', format('mint_kind must be cuid or ksuid, got %s', input_prefix(kind)));
  END IF;
  PERFORM require_control_plane('create_organization');
  INSERT INTO organizations AS o (id, slug, title, mint_kind, created_at, updated_at)
  VALUES (new_id, create_organization.slug, coalesce(option_text(opts, 'title'), create_organization.slug),
          kind, now(), now())
  ON CONFLICT ON CONSTRAINT organizations_slug_key DO NOTHING;
  IF NOT FOUND THEN
    PERFORM raise_error('RO006', format('an organization with slug %s already exists', create_organization.slug));
  END IF;
  RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_project(organization_id text, slug text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  new_id text := generate_cuid();
BEGIN
  PERFORM require_slug(create_project.slug, 'project');
  PERFORM require_control_plane('create_project');
  IF NOT EXISTS (SELECT FROM organizations AS o WHERE o.id = create_project.organization_id) THEN
    PERFORM raise_error('RO004', format('organization %s not found', input_prefix(create_project.organization_id)));
  END IF;
  INSERT INTO projects AS p (id, organization_id, slug, created_at, updated_at)
  VALUES (new_id, create_project.organization_id, create_project.slug, now(), now())
  ON CONFLICT ON CONSTRAINT projects_organization_id_slug_key DO NOTHING;
  IF NOT FOUND THEN
    PERFORM raise_error('RO006', format('project %s already exists in organization %s',
                                         create_project.slug, create_project.organization_id));
  END IF;
  RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_environment(project_id text, slug text, type text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  new_id text := generate_cuid();
  org_id text;
BEGIN
  PERFORM require_slug(create_environment.slug, 'environment');
  IF create_environment.type IS NULL
     OR create_environment.type NOT IN ('DEVELOPMENT', 'STAGING', 'PREVIEW', 'PRODUCTION') THEN
    PERFORM raise_error('RO006', format('environment type must be DEVELOPMENT, STAGING, PREVIEW or PRODUCTION, got %s',
                                         quote_nullable(input_prefix(create_environment.type))));
  END IF;
  PERFORM require_control_plane('create_environment');
  SELECT p.organization_id INTO org_id
  FROM projects AS p WHERE p.id = create_environment.project_id AND p.deleted_at IS NULL;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('project %s not found', input_prefix(create_environment.project_id)));
  END IF;
  INSERT INTO runtime_environments AS e (id, project_id, organization_id, slug, type, created_at, updated_at)
  VALUES (new_id, create_environment.project_id, org_id, create_environment.slug, create_environment.type,
          now(), now())
  ON CONFLICT ON CONSTRAINT runtime_environments_project_id_slug_key DO NOTHING;
  IF NOT FOUND THEN
    PERFORM raise_error('RO006', format('environment %s already exists in project %s',
                                         create_environment.slug, create_environment.project_id));
  END IF;
  RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION runops.update_environment(environment_id text, changes jsonb)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  c jsonb := require_object(changes, 'changes');
  every boolean;
BEGIN
  PERFORM reject_unknown_options(c, ARRAY['paused', 'archived', 'maximum_concurrency_limit', 'notifications'],
                                 'environment change');
  -- notifications: true (final statuses), false (none) or 'all' (every status; SPEC §4 [1.3]).
  IF option_value(c, 'notifications') IS NOT NULL
     AND jsonb_typeof(c -> 'notifications') <> 'boolean' AND c -> 'notifications' <> '"all"' THEN
    PERFORM raise_invalid('notifications', 'true, false or "all"', left((c -> 'notifications')::text, 100));
  END IF;
  every := CASE WHEN option_value(c, 'notifications') IS NOT NULL THEN c -> 'notifications' = '"all"' END;
  -- Parse every value before writing anything.
  PERFORM option_boolean(c, 'paused'), option_boolean(c, 'archived'),
          option_integer(c, 'maximum_concurrency_limit', 0, 100000);
  PERFORM require_control_plane('update_environment');
  UPDATE runtime_environments AS e
  SET paused = coalesce(option_boolean(c, 'paused'), e.paused),
      archived = coalesce(option_boolean(c, 'archived'), e.archived),
      notifications = coalesce(every OR (c ->> 'notifications')::boolean, e.notifications),
      notify_every_status = coalesce(every, e.notify_every_status),
      maximum_concurrency_limit = coalesce(option_integer(c, 'maximum_concurrency_limit', 0, 100000),
                                           e.maximum_concurrency_limit),
      updated_at = now()
  WHERE e.id = update_environment.environment_id;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('environment %s not found', input_prefix(update_environment.environment_id)));
  END IF;
END
$$;

-- The one builder of an environment_context, from the environment's row, its project's, its
-- organization's (NULL rows: an environment found nowhere) and the split settings (a store
-- without a settings row passes split_settings_before_sync()). Inlined SQL: the callers' queries
-- read the columns themselves.
CREATE OR REPLACE FUNCTION runops.environment_context_of(e runops.runtime_environments, p runops.projects,
                                                         o runops.organizations, s runops.split_settings)
RETURNS runops.environment_context
LANGUAGE sql IMMUTABLE
AS $$
  SELECT ROW(e.id, e.project_id, e.organization_id, e.type, e.paused, e.archived, p.deleted_at IS NOT NULL,
             o.runs_enabled, o.mint_kind, e.maximum_concurrency_limit, e.notifications,
             s.enabled, s.ever_enabled, s.default_mint_kind)::runops.environment_context
$$;

-- RO005's rule: an environment takes new work. The one predicate: trigger_run's fast path holds
-- it in its query (root_admission), require_usable asks it and explains a refusal. NULL is no.
CREATE OR REPLACE FUNCTION runops.environment_takes_new_work(ctx runops.environment_context)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT NOT ctx.archived AND NOT ctx.paused AND NOT ctx.project_deleted AND ctx.runs_enabled
$$;

-- The environment as new work sees it, with the split settings: local tables first (the
-- control plane's own, or the run-ops mirror), then — on run-ops only — the control plane
-- through the FDW: on a mirror miss, and whenever the mirror is older than the freshness bound
-- (then the split settings are read there too, so no admission and no root mint decision rests
-- on stale state). NULL id when it exists nowhere (the split fields are filled either way).
CREATE OR REPLACE FUNCTION runops.load_environment(environment_id text)
RETURNS runops.environment_context
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  ctx environment_context;
  s split_settings;
  loaded record;
  fresh boolean;
  stale text;
BEGIN
  -- The mirror's freshness comes with the same query (on the control plane, where it means
  -- nothing, it costs a two-row index scan): a separate call cost every run-ops admission 30 µs.
  -- LIMIT 1: store_config and split_settings are one-row tables the planner, without statistics
  -- (autovacuum never analyzes a table that does not change), takes for ~1,000 rows each; the
  -- cross product's estimate passed jit_above_cost, and every call compiled the plan: 7-15 ms.
  SELECT environment_context_of(e, p, o, coalesce(st, split_settings_before_sync())) AS ctx,
         mirror_within_bound(hb.fed_at, hb.bound_seconds) AS fresh
  INTO loaded
  FROM (SELECT f.fed_at, f.bound_seconds FROM mirror_feed() AS f LIMIT 1) AS hb
  LEFT JOIN split_settings AS st ON true
  LEFT JOIN runtime_environments AS e ON e.id = load_environment.environment_id
  LEFT JOIN projects AS p ON p.id = e.project_id
  LEFT JOIN organizations AS o ON o.id = e.organization_id;
  ctx := loaded.ctx;
  fresh := loaded.fresh;
  IF local_residency() = 'LEGACY' OR (ctx.id IS NOT NULL AND fresh) THEN
    RETURN ctx;  -- the hot path: found in a fresh mirror, nothing more to read
  END IF;
  IF NOT peer_wired() THEN
    RETURN ctx;
  END IF;
  stale := CASE WHEN NOT fresh OR fresh IS NULL THEN mirror_stale() END;
  BEGIN
    IF stale IS NULL THEN
      s := current_split_settings();
    ELSE
      SELECT * INTO s FROM runops_peer.split_settings;
      IF NOT FOUND THEN
        s := split_settings_before_sync();
      END IF;
    END IF;
    -- The other store's rows are read into this store's row types by column name, so the two
    -- stores' tables need not agree on column order.
    SELECT (environment_context_of(jsonb_populate_record(NULL::runtime_environments, to_jsonb(e)),
                                   jsonb_populate_record(NULL::projects, to_jsonb(p)),
                                   jsonb_populate_record(NULL::organizations, to_jsonb(o)), s)).*
    INTO ctx
    FROM runops_peer.runtime_environments AS e
    JOIN runops_peer.projects AS p ON p.id = e.project_id
    JOIN runops_peer.organizations AS o ON o.id = e.organization_id
    WHERE e.id = load_environment.environment_id;
    IF NOT FOUND THEN
      ctx := environment_context_of(NULL, NULL, NULL, s);  -- found nowhere; the split settings as read
    END IF;
  EXCEPTION WHEN connection_exception THEN
    IF stale IS NOT NULL THEN
      PERFORM raise_error('RO009', 'the tenant mirror on this run-ops store is ' || stale
                                   || ', and the control-plane store is unavailable to refresh it',
                          NULL, 'new work resumes when replication or tick''s pull brings the mirror up to date');
    END IF;
    PERFORM raise_error('RO009', 'the control-plane store is unavailable, and environment '
                                 || input_prefix(load_environment.environment_id) || ' is not in the local mirror yet');
  END;
  RETURN ctx;
END
$$;

-- The freshness rule: a mirror last fed at fed_at (NULL: never) may carry new work. Inlined
-- into its callers (a single expression).
CREATE OR REPLACE FUNCTION runops.mirror_within_bound(fed_at timestamptz, bound_seconds integer)
RETURNS boolean
LANGUAGE sql STABLE
AS $$
  SELECT coalesce(fed_at >= pg_catalog.now() - pg_catalog.make_interval(secs => bound_seconds), false)
$$;

-- When the mirror was last fed (NULL: never) and the store's freshness bound, as one row. Fed by
-- the newest of: the control plane's tick as replication delivered it, this store's last pull,
-- and — only when those two are older than the bound — the subscription's own progress
-- (mirror_replicated_at), so a stopped ticker costs the hot path no trip through the FDW while
-- replication applies, and a running one costs it nothing more than the heartbeat read.
-- Set-returning SQL, so the hot paths (load_environment, root_admission) inline it into their
-- own query instead of calling it; the CASE reads the subscription only when its branch is taken.
CREATE OR REPLACE FUNCTION runops.mirror_feed()
RETURNS TABLE (fed_at timestamptz, bound_seconds integer)
LANGUAGE sql STABLE
AS $$
  SELECT CASE WHEN runops.mirror_within_bound(hb.fed_at, c.mirror_freshness_seconds) THEN hb.fed_at
              ELSE greatest(hb.fed_at, runops.mirror_replicated_at_memo()) END,
         c.mirror_freshness_seconds
  FROM runops.store_config AS c
  CROSS JOIN LATERAL (SELECT max(b.beat_at) AS fed_at FROM runops.heartbeats AS b
                      WHERE b.source IN ('control_plane_tick', 'mirror_pull')) AS hb
$$;

-- How far logical replication has brought the mirror, by the subscription's own progress: the
-- control plane's time in the last keepalive its walsender sent (pg_stat_subscription's
-- latest_end_time) — sent once the walsender has streamed all the WAL there is, after the
-- changes it streams, and at least every wal_receiver_timeout / 2 (30 s by default) when nothing
-- changes, because the apply worker asks for one. The apply worker applies each change before
-- it reads the next message, so the mirror holds the control plane's tenant state as of then.
-- NULL unless the subscription is enabled and its apply worker runs (a disabled, erroring or
-- slot-less subscription feeds nothing: the bound bites, and the pull stands in). Keepalives
-- come 30 s apart on an idle control plane, so a bound below that needs a lower
-- wal_receiver_timeout on the run-ops server (or the ticker) to stay fresh.
CREATE OR REPLACE FUNCTION runops.mirror_replicated_at()
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
  SELECT max(st.latest_end_time)
  FROM pg_catalog.pg_subscription AS s
  CROSS JOIN LATERAL pg_catalog.pg_stat_get_subscription(s.oid) AS st
  WHERE s.subname = 'runops_mirror' AND s.subenabled AND st.pid IS NOT NULL AND st.relid IS NULL
    AND s.subdbid = (SELECT d.oid FROM pg_catalog.pg_database AS d WHERE d.datname = pg_catalog.current_database())
$$;

-- mirror_replicated_at for the hot path, read at most once a second per session. With the ticker
-- stopped every trigger takes mirror_feed's fallback, and the subscription's progress cost it
-- about 100 µs of CPU a call (the catalog join and pg_stat_get_subscription's scan of the
-- worker slots): about half the no-key trigger. A session keeps the answer and when it asked in
-- a custom setting (session-level, so it outlives the transaction; behind a transaction pooler
-- another client's transaction may find it, which is harmless: it is a past reading of this
-- database's own subscription). A reading up to a second old only makes the mirror look older
-- than it is, never fresher, so the freshness bound still holds.
CREATE OR REPLACE FUNCTION runops.mirror_replicated_at_memo()
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  memo text := pg_catalog.current_setting('runops.mirror_progress', true);
  asked timestamptz := pg_catalog.clock_timestamp();
  progress timestamptz;
BEGIN
  IF memo LIKE '%|%' AND split_part(memo, '|', 1)::timestamptz > asked - interval '1 second' THEN
    RETURN nullif(split_part(memo, '|', 2), '')::timestamptz;
  END IF;
  progress := runops.mirror_replicated_at();
  PERFORM pg_catalog.set_config('runops.mirror_progress', asked::text || '|' || coalesce(progress::text, ''), false);
  RETURN progress;
END
$$;

-- When the mirror was last fed (mirror_feed), for the cold paths.
CREATE OR REPLACE FUNCTION runops.mirror_fed_at()
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN (SELECT f.fed_at FROM mirror_feed() AS f);
END
$$;

-- Whether this database subscribes to the control plane's tenant tables (enabled or not).
CREATE OR REPLACE FUNCTION runops.mirror_subscribed()
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN EXISTS (SELECT FROM pg_subscription AS s WHERE s.subname = 'runops_mirror'
                 AND s.subdbid = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database()));
END
$$;

-- NULL while the run-ops store's tenant mirror is within the freshness bound
-- (store_config.mirror_freshness_seconds); otherwise how stale it is, in words for RO009. The
-- mirror is as fresh as the newer of two heartbeats: the control plane's tick as replication
-- delivered it, and this store's last pull. Real time (pg_catalog.now()), never the test clock:
-- replication does not follow runops.now().
CREATE OR REPLACE FUNCTION runops.mirror_stale()
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
-- PL/pgSQL, not SQL: a SQL function that cannot be inlined is planned on every call.
DECLARE
  fed_at timestamptz;
  bound integer;
BEGIN
  SELECT f.fed_at, f.bound_seconds INTO fed_at, bound FROM mirror_feed() AS f;
  IF mirror_within_bound(fed_at, bound) THEN
    RETURN NULL;
  ELSIF fed_at IS NULL THEN
    RETURN format('never refreshed (bound %s s)', bound);
  END IF;
  RETURN format('%s s old (bound %s s)', floor(extract(epoch FROM pg_catalog.now() - fed_at)), bound);
END
$$;

-- How the run-ops store's tenant mirror is fed and how fresh it is (`runops doctor`, metrics):
--   engine  subscription | pull | none (run-ops not wired); home on the control plane
--   state   applying | disabled | not_running (enabled, no apply worker: erroring or its slot is
--           gone) | pull | unwired
-- age_seconds is from the newest of the mirror heartbeats and the subscription's progress
-- (replicated_at); fresh says whether new work may rest on the mirror.
CREATE OR REPLACE FUNCTION runops.mirror_status()
RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  sub record;
  engine text;
  state text;
  cp_tick timestamptz;
  pulled timestamptz;
  replicated timestamptz;
  bound integer;
BEGIN
  IF local_residency() = 'LEGACY' THEN
    RETURN jsonb_build_object('engine', 'home', 'fresh', true);
  END IF;
  SELECT s.subenabled AS enabled, st.pid IS NOT NULL AS running INTO sub
  FROM pg_subscription AS s
  LEFT JOIN pg_stat_subscription AS st ON st.subid = s.oid AND st.relid IS NULL
  WHERE s.subname = 'runops_mirror'
    AND s.subdbid = (SELECT d.oid FROM pg_database AS d WHERE d.datname = current_database());
  IF FOUND THEN
    engine := 'subscription';
    state := CASE WHEN NOT sub.enabled THEN 'disabled' WHEN NOT sub.running THEN 'not_running' ELSE 'applying' END;
  ELSIF peer_wired() THEN
    engine := 'pull';
    state := 'pull';
  ELSE
    engine := 'none';
    state := 'unwired';
  END IF;
  SELECT max(h.beat_at) FILTER (WHERE h.source = 'control_plane_tick'),
         max(h.beat_at) FILTER (WHERE h.source = 'mirror_pull')
  INTO cp_tick, pulled FROM heartbeats AS h;
  SELECT c.mirror_freshness_seconds INTO bound FROM store_config AS c;
  replicated := mirror_replicated_at();
  RETURN jsonb_build_object(
    'engine', engine,
    'state', state,
    'subscription_enabled', sub.enabled,
    'worker_running', sub.running,
    'control_plane_tick_at', cp_tick,
    'pulled_at', pulled,
    'replicated_at', replicated,
    'age_seconds', round(extract(epoch FROM pg_catalog.now() - greatest(cp_tick, pulled, replicated))::numeric, 3),
    'bound_seconds', bound,
    'fresh', mirror_stale() IS NULL);
END
$$;

-- RO004 when the environment does not exist, RO005 when it may not take new work: the rule is
-- environment_takes_new_work's; this only says why (or, for a reason it does not know, that it
-- cannot).
CREATE OR REPLACE FUNCTION runops.require_usable(ctx runops.environment_context, environment_id text)
RETURNS runops.environment_context
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF ctx.id IS NULL THEN
    PERFORM raise_error('RO004', format('environment %s not found', quote_nullable(input_prefix(environment_id))));
  END IF;
  IF NOT EXISTS (SELECT FROM environment_here(ctx.id)) THEN
    PERFORM refuse_other_shards_environment(ctx.id);  -- shards.sql: RO002 on a shard not the environment's
  END IF;
  IF environment_takes_new_work(ctx) IS NOT TRUE THEN
    PERFORM raise_error('RO005',
      format('environment %s cannot take new work', ctx.id)
      || coalesce(': it is ' || CASE WHEN ctx.archived THEN 'archived' WHEN ctx.paused THEN 'paused'
                                     WHEN ctx.project_deleted THEN 'in a deleted project'
                                     WHEN NOT ctx.runs_enabled THEN 'in an organization whose runs are disabled' END, ''),
      NULL, 'unpause it with update_environment, or trigger in another environment');
  END IF;
  RETURN ctx;
END
$$;

CREATE OR REPLACE FUNCTION runops.require_environment_for_new_work(environment_id text)
RETURNS runops.environment_context
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN require_usable(load_environment(environment_id), environment_id);
END
$$;

-- The mirror's pull through the FDW: the engine when logical replication is not available,
-- and the stand-in whenever replication is not applying (tick pulls once the mirror is older
-- than pull_mirror_for_tick's threshold). While a subscription exists — even disabled or broken
-- — the pull only refreshes rows the mirror already has: a row it inserted would make the
-- subscription's own INSERT of it fail once it applies again, and stop it. New tenants are read
-- through on a mirror miss meanwhile (load_environment). Either way it stamps the mirror_pull
-- heartbeat: the mirror is now as fresh as this pull.
CREATE OR REPLACE FUNCTION runops.pull_tenant_mirror()
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := 0;
  k integer;
BEGIN
  IF local_residency() <> 'NEW' OR NOT peer_wired() THEN
    RETURN 0;
  END IF;
  IF mirror_subscribed() THEN
    UPDATE organizations AS o SET slug = p.slug, title = p.title, mint_kind = p.mint_kind,
      runs_enabled = p.runs_enabled, updated_at = p.updated_at
    FROM runops_peer.organizations AS p WHERE p.id = o.id AND o.updated_at IS DISTINCT FROM p.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    UPDATE projects AS o SET slug = p.slug, deleted_at = p.deleted_at, updated_at = p.updated_at
    FROM runops_peer.projects AS p WHERE p.id = o.id AND o.updated_at IS DISTINCT FROM p.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    UPDATE runtime_environments AS o SET slug = p.slug, paused = p.paused, archived = p.archived,
      maximum_concurrency_limit = p.maximum_concurrency_limit, notifications = p.notifications,
      notify_every_status = p.notify_every_status, updated_at = p.updated_at
    FROM runops_peer.runtime_environments AS p WHERE p.id = o.id AND o.updated_at IS DISTINCT FROM p.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    UPDATE split_settings AS o SET enabled = p.enabled, ever_enabled = p.ever_enabled,
      default_mint_kind = p.default_mint_kind, updated_at = p.updated_at,
      claims_backfilled_at = p.claims_backfilled_at
    FROM runops_peer.split_settings AS p WHERE o.updated_at IS DISTINCT FROM p.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    UPDATE environment_shards AS o SET shard = p.shard, pinned = p.pinned, assigned_at = p.assigned_at
    FROM runops_peer.environment_shards AS p
    WHERE p.environment_id = o.environment_id AND o.assigned_at IS DISTINCT FROM p.assigned_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    UPDATE alert_channels AS o SET target = p.target, events = p.events, secret = p.secret, enabled = p.enabled,
      updated_at = p.updated_at, deleted_at = p.deleted_at
    FROM runops_peer.alert_channels AS p WHERE p.id = o.id AND o.updated_at IS DISTINCT FROM p.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
  ELSE
    INSERT INTO organizations SELECT * FROM runops_peer.organizations
    ON CONFLICT (id) DO UPDATE SET slug = excluded.slug, title = excluded.title, mint_kind = excluded.mint_kind,
      runs_enabled = excluded.runs_enabled, updated_at = excluded.updated_at
    WHERE organizations.updated_at IS DISTINCT FROM excluded.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    INSERT INTO projects SELECT * FROM runops_peer.projects
    ON CONFLICT (id) DO UPDATE SET slug = excluded.slug, deleted_at = excluded.deleted_at,
      updated_at = excluded.updated_at
    WHERE projects.updated_at IS DISTINCT FROM excluded.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    INSERT INTO runtime_environments SELECT * FROM runops_peer.runtime_environments
    ON CONFLICT (id) DO UPDATE SET slug = excluded.slug, paused = excluded.paused, archived = excluded.archived,
      maximum_concurrency_limit = excluded.maximum_concurrency_limit, notifications = excluded.notifications,
      notify_every_status = excluded.notify_every_status, updated_at = excluded.updated_at
    WHERE runtime_environments.updated_at IS DISTINCT FROM excluded.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    INSERT INTO split_settings SELECT * FROM runops_peer.split_settings
    ON CONFLICT (singleton) DO UPDATE SET enabled = excluded.enabled, ever_enabled = excluded.ever_enabled,
      default_mint_kind = excluded.default_mint_kind, updated_at = excluded.updated_at,
      claims_backfilled_at = excluded.claims_backfilled_at
    WHERE split_settings.updated_at IS DISTINCT FROM excluded.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    INSERT INTO environment_shards SELECT * FROM runops_peer.environment_shards
    ON CONFLICT (environment_id) DO UPDATE SET shard = excluded.shard, pinned = excluded.pinned,
      assigned_at = excluded.assigned_at
    WHERE environment_shards.assigned_at IS DISTINCT FROM excluded.assigned_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    INSERT INTO alert_channels SELECT * FROM runops_peer.alert_channels
    ON CONFLICT (id) DO UPDATE SET target = excluded.target, events = excluded.events, secret = excluded.secret,
      enabled = excluded.enabled, updated_at = excluded.updated_at, deleted_at = excluded.deleted_at
    WHERE alert_channels.updated_at IS DISTINCT FROM excluded.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
  END IF;
  PERFORM beat('mirror_pull');
  RETURN n;
END
$$;

-- Stamps a heartbeat with this transaction's time. Concurrent ticks do not queue on the row: one
-- that finds it locked skips (the holder is stamping it anyway).
CREATE OR REPLACE FUNCTION runops.beat(of_source text)
RETURNS void
LANGUAGE sql VOLATILE
AS $$
  UPDATE runops.heartbeats AS h SET beat_at = pg_catalog.now()
  WHERE h.source = (SELECT l.source FROM runops.heartbeats AS l WHERE l.source = of_source FOR UPDATE SKIP LOCKED)
$$;

-- What the mirror must equal: a digest of the tenant rows and the split settings. Operator
-- commands compare it across the stores to wait until a change has replicated.
CREATE OR REPLACE FUNCTION runops.mirror_fingerprint()
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
  SELECT md5(concat_ws('|',
    (SELECT string_agg(o.id || extract(epoch FROM o.updated_at)::text || coalesce(o.mint_kind, '-'), ',' ORDER BY o.id) FROM organizations AS o),
    (SELECT string_agg(p.id || extract(epoch FROM p.updated_at)::text, ',' ORDER BY p.id) FROM projects AS p),
    (SELECT string_agg(e.id || extract(epoch FROM e.updated_at)::text, ',' ORDER BY e.id) FROM runtime_environments AS e),
    (SELECT string_agg(c.id || extract(epoch FROM c.updated_at)::text, ',' ORDER BY c.id) FROM alert_channels AS c),
    (SELECT string_agg(s.enabled::text || s.ever_enabled::text || s.default_mint_kind || extract(epoch FROM s.updated_at)::text, ',')
     FROM split_settings AS s)))
$$;

-- Tenants as an operator sees them (`runops env list`): every environment with its project,
-- organization and the mint kind its roots follow. Control plane only (the home of tenants).
CREATE OR REPLACE FUNCTION runops.list_environments(of_organization_id text DEFAULT NULL)
RETURNS TABLE (environment_id text, environment_slug text, type text, project_id text, project_slug text,
               organization_id text, organization_slug text, mint_kind text, paused boolean, archived boolean,
               created_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  org text := of_organization_id;
BEGIN
  PERFORM require_control_plane('list_environments');
  RETURN QUERY
  SELECT e.id::text, e.slug, e.type, p.id::text, p.slug, o.id::text, o.slug,
         coalesce(o.mint_kind, s.default_mint_kind), e.paused, e.archived, e.created_at
  FROM runtime_environments AS e
  JOIN projects AS p ON p.id = e.project_id
  JOIN organizations AS o ON o.id = e.organization_id
  CROSS JOIN current_split_settings() AS s
  WHERE org IS NULL OR e.organization_id = org
  ORDER BY o.slug, p.slug, e.slug;
END
$$;
