-- Idempotency in one store (SPEC §4): the dedup key, when a held key is dead, and the one routine
-- that decides "cached, dead (released), or create" for a run. Across both stores the claim
-- ledger (claims.sql) stands beside it.
--
--   idempotency_key_hash     the dedup key, exactly as the SPEC writes it
--   idempotency_key_expired  the expiry rule, which batch and waitpoint keys follow too
--   idempotency_key_is_dead  expired, or its run ended in a status that releases it (run_statuses)
--   release_idempotency_keys the one release of run keys: dead ones, a reset, an expiry
--   find_or_create_run               single triggers, children and failed-task runs
--   reset_idempotency_key    public: clear a key on this store's runs

-- The dedup key, exactly as the SPEC writes it: sha256 of key and salt joined by '-'. With no
-- parent every scope acts as global. STABLE, like convert_to inside it: an IMMUTABLE label over
-- a STABLE body stops PostgreSQL inlining it, and then it is planned again in every transaction.
CREATE OR REPLACE FUNCTION runops.idempotency_key_hash(key text, scope text, parent_run_id text,
                                                       parent_attempt_number integer)
RETURNS text
LANGUAGE sql STABLE
AS $$
  SELECT encode(sha256(convert_to(array_to_string(
           ARRAY[key] || CASE
                           WHEN parent_run_id IS NULL OR scope = 'global' THEN ARRAY[]::text[]
                           WHEN scope = 'attempt' THEN ARRAY['run_' || parent_run_id, parent_attempt_number::text]
                           ELSE ARRAY['run_' || parent_run_id]
                         END, '-'), 'UTF8')), 'hex')
$$;

-- A key has expired once its expiry has come (at the caller's runops.now(), passed in so a
-- set-based caller reads the clock once). Run, batch and waitpoint keys all expire so.
CREATE OR REPLACE FUNCTION runops.idempotency_key_expired(expires_at timestamptz, at timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT expires_at <= at
$$;

-- A run's held key is dead — ignored by dedup — once it expired or its run ended in a status
-- that releases it (runops.run_statuses.releases_key).
CREATE OR REPLACE FUNCTION runops.idempotency_key_is_dead(status text, expires_at timestamptz, at timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT runops.idempotency_key_expired(expires_at, at) OR runops.status_releases_key(status)
$$;

-- The one release of run keys: each run lets go of its key (raw key, hash and expiry), so a new
-- run can hold it; reads of the old run then show no key. key_hashes, position by position,
-- names the key to release: a run that no longer holds it (a concurrent releaser got there
-- first) is left alone. A NULL hash releases whatever key the run holds. Returns how many let go.
CREATE OR REPLACE FUNCTION runops.release_idempotency_keys(run_ids text[], key_hashes text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  released integer;
BEGIN
  UPDATE runs AS r
  SET idempotency_key = NULL, idempotency_key_hash = NULL, idempotency_key_expires_at = NULL, updated_at = now()
  FROM unnest(run_ids, key_hashes) AS u(id, key_hash)
  WHERE r.id = u.id AND r.idempotency_key_hash = coalesce(u.key_hash, r.idempotency_key_hash);
  GET DIAGNOSTICS released = ROW_COUNT;
  RETURN released;
END
$$;

-- Creates one run in this store, or returns the run that already holds its key (or its
-- pre-minted id): its bare id (the public functions add the prefix). The caller has validated
-- everything, decided this store owns the run, and looked up the parent (require_parent; a NULL
-- row for a root).
--
-- Why a loop: in READ COMMITTED a conflicting row committed after our SELECT's snapshot makes
-- INSERT ... ON CONFLICT DO NOTHING return nothing, and only a *new* statement sees the
-- winner. Reading first keeps the cached path free of id minting and of any write.
CREATE OR REPLACE FUNCTION runops.find_or_create_run(
  env runops.environment_context, parent runops.runs, task_identifier text, payload jsonb,
  spec runops.trigger_spec, initial_status text, error jsonb,
  OUT run_id text, OUT is_cached boolean, OUT status text, OUT residency text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  key_hash text;
  existing record;
  new_id text;
  run_status text := initial_status;
  attempts integer := 0;
  must_claim boolean;
  claim record;
BEGIN
  residency := local_residency();
  IF spec.idempotency_key IS NOT NULL THEN
    key_hash := idempotency_key_hash(spec.idempotency_key, spec.idempotency_key_scope, spec.parent_run_id,
                                     coalesce(spec.parent_attempt_number, parent.attempt_number));
  END IF;
  IF run_status IS NULL THEN
    run_status := CASE WHEN spec.delay_until > ts THEN 'DELAYED' ELSE 'PENDING' END;
  END IF;

  LOOP
    attempts := attempts + 1;
    IF attempts > 8 THEN
      -- Only reachable when rows keep appearing and vanishing under us (purges racing triggers).
      PERFORM raise_error('RO008', 'trigger kept conflicting with concurrent writes; retry the same call');
    END IF;

    IF spec.run_id IS NOT NULL THEN
      SELECT r.id, r.environment_id, r.task_identifier, r.status INTO existing
      FROM runs AS r WHERE r.id = spec.run_id;
      IF FOUND THEN
        IF existing.environment_id <> env.id
           OR existing.task_identifier <> find_or_create_run.task_identifier THEN
          PERFORM raise_error('RO006', format('pre-minted run id run_%s already names a run of another environment or task',
                                               spec.run_id));
        END IF;
        run_id := existing.id; is_cached := true; status := existing.status;
        PERFORM wait_for_child(spec, parent, existing.id, existing.status);
        RETURN;
      END IF;
    END IF;

    IF key_hash IS NOT NULL THEN
      SELECT r.id, r.status, r.idempotency_key_expires_at AS expires_at INTO existing
      FROM runs AS r
      WHERE r.environment_id = env.id AND r.task_identifier = find_or_create_run.task_identifier
        AND r.idempotency_key_hash = key_hash;
      IF FOUND THEN
        IF NOT idempotency_key_is_dead(existing.status, existing.expires_at, ts) THEN
          run_id := existing.id; is_cached := true; status := existing.status;
          -- Trigger-and-wait on a cached run waits on that run (at once done if it finished).
          PERFORM wait_for_child(spec, parent, existing.id, existing.status);
          RETURN;
        END IF;
        -- Dead key: release it so the new run can hold it.
        PERFORM release_idempotency_keys(ARRAY[existing.id], ARRAY[key_hash]);
      END IF;
    END IF;

    new_id := coalesce(spec.run_id, mint_id());
    -- Across the seam (SPEC §6): once the split was ever enabled, a new key holder first claims
    -- the key in the ledger, which may name a live holder in either store.
    IF key_hash IS NOT NULL THEN
      IF must_claim IS NULL AND local_residency() = 'LEGACY' THEN
        -- Decided under the gate lock, against the settings as they are now.
        PERFORM lock_key_claim(env.id, find_or_create_run.task_identifier, key_hash);
        must_claim := claims_required();
        IF must_claim THEN
          CONTINUE;  -- read the local holder again, now that same-key claimants queue behind us
        END IF;
      END IF;
      must_claim := coalesce(must_claim, env.split_ever_enabled);  -- run-ops: the ledger is local
      IF must_claim THEN
        claim := claim_idempotency_key(env.id, find_or_create_run.task_identifier, key_hash,
                                       ts + spec.idempotency_key_ttl, new_id);
        IF claim.holder_id IS NOT NULL THEN
          run_id := claim.holder_id; is_cached := true; status := claim.holder_status;
          residency := classify_bare(claim.holder_id);
          PERFORM wait_for_child(spec, parent, claim.holder_id, claim.holder_status);
          RETURN;
        END IF;
      END IF;
    END IF;
    IF key_hash IS NULL AND spec.run_id IS NULL THEN
      -- A fresh id conflicts with nothing: a plain INSERT (no speculative-insert WAL record).
      INSERT INTO runs
      SELECT * FROM new_run(new_id, env, parent, spec.batch_id, spec.batch_index, find_or_create_run.task_identifier,
                            find_or_create_run.payload, spec, run_status, find_or_create_run.error, NULL, NULL, NULL,
                            ts);
    ELSE
      INSERT INTO runs
      SELECT * FROM new_run(new_id, env, parent, spec.batch_id, spec.batch_index, find_or_create_run.task_identifier,
                            find_or_create_run.payload, spec, run_status, find_or_create_run.error,
                            spec.idempotency_key, key_hash, ts + spec.idempotency_key_ttl, ts)
      ON CONFLICT DO NOTHING;
    END IF;
    IF FOUND THEN
      run_id := new_id; is_cached := false; status := run_status;
      IF spec.resume_parent_on_completion THEN
        PERFORM wait_for_child(spec, parent, new_id, run_status);
      END IF;
      RETURN;
    END IF;
    -- Lost a race on the key or on the pre-minted id: the next pass reads the winner.
  END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION runops.reset_idempotency_key(
  environment_id text, task_identifier text, idempotency_key text, scope text DEFAULT 'run',
  parent_run_id text DEFAULT NULL, parent_attempt_number integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  parent text;
  holders text[];
BEGIN
  IF reset_idempotency_key.idempotency_key IS NULL OR reset_idempotency_key.idempotency_key = ''
     OR length(reset_idempotency_key.idempotency_key) > 2048 THEN
    PERFORM raise_error('RO006', 'idempotency_key must be 1 to 2048 characters');
  END IF;
  IF coalesce(scope, 'run') NOT IN ('run', 'attempt', 'global') THEN
    PERFORM raise_error('RO006', format('scope must be run, attempt or global, got %s', quote_nullable(input_prefix(scope))));
  END IF;
  IF reset_idempotency_key.parent_run_id IS NOT NULL THEN
    parent := require_id(reset_idempotency_key.parent_run_id, 'run', 'parent_run_id');
    IF scope = 'attempt' AND reset_idempotency_key.parent_attempt_number IS NULL THEN
      PERFORM raise_error('RO006', 'an attempt-scoped key needs parent_attempt_number');
    END IF;
  END IF;
  SELECT array_agg(r.id) INTO holders FROM runs AS r
  WHERE r.environment_id = reset_idempotency_key.environment_id
    AND r.task_identifier = reset_idempotency_key.task_identifier
    AND r.idempotency_key_hash = idempotency_key_hash(reset_idempotency_key.idempotency_key, coalesce(scope, 'run'),
                                                      parent, reset_idempotency_key.parent_attempt_number);
  RETURN coalesce(release_idempotency_keys(holders, NULL), 0);
END
$$;
