-- One key, one run across both stores (SPEC §6): the claim ledger protocol.
--
--   claims_required        whether a keyed trigger in this store must claim (split ever enabled, peer wired)
--   keyed_claims_required  the same, decided once per call on the hot path
--   lock_key_claim         control plane: serialise same-key claimants here, and against enable_split
--   judge_claim            is the holder a claim names live, dead, or still committing?
--   claim_idempotency_key  claim a key for a run about to be created, or learn the live holder
--   backfill_claims        enable_split: claims for the keys that predate the split
--   complete_claims_backfill  `runops migrate`: the same for a store upgraded from r0001
--   adopt_unclaimed_holder    until then, a new claim checks the other store's runs
--   prune_claims           tick (run-ops): drop claims long past their expiry
--   claim_ledger_shard     control plane: the shard k >= 1 whose ledger holds an environment's claims
--
-- The argument that this yields exactly one key-holding run is docs/idempotency-across-stores.md.

CREATE OR REPLACE FUNCTION runops.claims_required()
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN (current_split_settings()).ever_enabled AND peer_wired();
END
$$;

-- Whether a keyed write here must claim, decided once per call: on the run-ops store the
-- environment context already says whether the split was ever enabled (the ledger is local); on
-- the control plane under the shared split gate, so enable_split's backfill sees every keyed run
-- that decided not to claim.
CREATE OR REPLACE FUNCTION runops.keyed_claims_required(env runops.environment_context)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  IF local_residency() = 'NEW' THEN
    RETURN coalesce(env.split_ever_enabled, false);
  END IF;
  PERFORM pg_advisory_xact_lock_shared(1919250031, 1);
  RETURN claims_required();
END
$$;

-- Control plane only. Same-key claimants on this store queue on a per-key advisory lock, held to
-- the end of the transaction, so a claimant judging a claim written here never sees a claimant
-- mid-commit (locks are released after the commit is visible). The shared gate lock orders keyed
-- triggers against enable_split (which takes it exclusively and backfills the claims): a trigger
-- that decided not to claim has committed before the backfill reads the runs.
CREATE OR REPLACE FUNCTION runops.lock_key_claim(environment_id text, task_identifier text, key_hash text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  PERFORM pg_advisory_xact_lock_shared(1919250031, 1);
  PERFORM pg_advisory_xact_lock(hashtextextended(environment_id || '/' || task_identifier || '/' || key_hash, 0));
END
$$;

-- With several run-ops shards the control plane writes an environment's claims into the ledger of
-- the shard the environment lives on (environment_shard), where that environment's NEW triggers
-- claim: shard 0 through the static runops_peer statements (plan-cached: one store pays nothing
-- more than this inlined read of store_config), shard k >= 1 through runops_peer_<k> by EXECUTE
-- (that schema exists only where `runops migrate` wired the shard). docs/scale-out.md, "Mirror and
-- FDW per shard"; shard_peer in shards.sql). A set-returning SQL function, so it inlines into the
-- caller's query.
CREATE OR REPLACE FUNCTION runops.claim_ledger_shard(environment_id text)
RETURNS TABLE (shard integer)
LANGUAGE sql STABLE
AS $$
  SELECT s.shard FROM runops.store_config AS c
  JOIN runops.environment_shards AS s ON s.environment_id = claim_ledger_shard.environment_id
  WHERE c.shard_count > 1 AND s.shard > 0
$$;

-- The verdict on a claim's holder, read in this store or through the FDW:
--   LIVE     the holder exists, still carries the key, and the key is not dead: it is the run
--   DEAD     expired, ended badly, lost its key (reset), or never committed: take the claim over
--   PENDING  the control-plane transaction that wrote the claim had not finished when we looked
--            (postgres_fdw commits the remote claim just before the local run): retry (RO008)
-- For a holder written by a control-plane transaction (claimant_xid), "finished" is asked of the
-- snapshot the holder is read in, in the same statement, so the two answers agree: a claimant
-- that finished before that snapshot either committed its run (visible) or never will.
CREATE OR REPLACE FUNCTION runops.judge_claim(environment_id text, task_identifier text, key_hash text,
                                              run_id text, claimant_xid bigint, expires_at timestamptz,
                                              at timestamptz, OUT verdict text, OUT holder_status text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  residency text := try_classify_bare(run_id);
  finished boolean;
  h_hash text;
  h_expires_at timestamptz;
  h_environment text;
  h_task text;
  ledger_shard integer;
  peer text;
BEGIN
  IF expires_at <= at OR residency IS NULL THEN
    verdict := 'DEAD';
    RETURN;
  END IF;
  IF residency = local_residency() THEN
    -- One statement, one snapshot: "finished" and the holder's row agree.
    SELECT claimant_xid IS NULL OR claimant_xid = pg_current_xact_id()::text::bigint
             OR pg_visible_in_snapshot(claimant_xid::text::xid8, pg_current_snapshot()),
           r.status, r.idempotency_key_hash, r.idempotency_key_expires_at, r.environment_id, r.task_identifier
    INTO finished, holder_status, h_hash, h_expires_at, h_environment, h_task
    FROM (SELECT) AS one
    LEFT JOIN runs AS r ON r.id = judge_claim.run_id;
  ELSE
    -- On the control plane the holder is on the environment's shard, where the claim was read.
    IF local_residency() = 'LEGACY' THEN
      SELECT l.shard INTO ledger_shard FROM claim_ledger_shard(judge_claim.environment_id) AS l;
      IF ledger_shard IS NOT NULL THEN
        peer := shard_peer(ledger_shard, 'environment ' || input_prefix(judge_claim.environment_id));
      END IF;
    END IF;
    -- postgres_fdw reads every foreign table of this transaction in one REPEATABLE READ
    -- snapshot (per server), so the snapshot the view reports is the one the holder is read in.
    BEGIN
      finished := claimant_xid IS NULL;
      IF peer IS NULL THEN
        IF NOT finished THEN
          SELECT pg_visible_in_snapshot(claimant_xid::text::xid8, v.snapshot::pg_snapshot) INTO finished
          FROM runops_peer.xact_snapshot_view AS v;
        END IF;
        SELECT r.status, r.idempotency_key_hash, r.idempotency_key_expires_at, r.environment_id, r.task_identifier
        INTO holder_status, h_hash, h_expires_at, h_environment, h_task
        FROM runops_peer.runs AS r WHERE r.id = judge_claim.run_id;
      ELSE
        IF NOT finished THEN
          EXECUTE format('SELECT pg_catalog.pg_visible_in_snapshot($1::text::xid8, v.snapshot::pg_catalog.pg_snapshot) '
                         'FROM %I.xact_snapshot_view AS v', peer)
          INTO finished USING claimant_xid;
        END IF;
        EXECUTE format('SELECT r.status, r.idempotency_key_hash, r.idempotency_key_expires_at, r.environment_id, '
                       'r.task_identifier FROM %I.runs AS r WHERE r.id = $1', peer)
        INTO holder_status, h_hash, h_expires_at, h_environment, h_task USING judge_claim.run_id;
      END IF;
    EXCEPTION WHEN connection_exception THEN
      PERFORM raise_error('RO009', format('the %s store, which holds the run claiming this idempotency key, is unavailable: %s',
                                          store_for_residency(residency), SQLERRM));
    END;
  END IF;
  IF NOT finished THEN
    verdict := 'PENDING';
  ELSIF holder_status IS NULL OR h_hash IS DISTINCT FROM key_hash OR h_environment <> judge_claim.environment_id
        OR h_task <> judge_claim.task_identifier OR idempotency_key_is_dead(holder_status, h_expires_at, at) THEN
    verdict := 'DEAD';
  ELSE
    verdict := 'LIVE';
  END IF;
END
$$;

-- Claims the key for run_id (about to be created by the caller, in this transaction), or returns
-- the live holder (holder_id, bare) for the caller to return as cached. A dead holder's claim is
-- taken over with a compare-and-swap; a dead local holder lets go of its key at once, a dead
-- holder in the other store is cleared lazily by its own store. On the run-ops store the ledger
-- is local (atomic with the run); on the control plane it is written through the FDW, under
-- lock_key_claim.
CREATE OR REPLACE FUNCTION runops.claim_idempotency_key(environment_id text, task_identifier text, key_hash text,
                                                        expires_at timestamptz, run_id text,
                                                        OUT holder_id text, OUT holder_status text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  local_ledger constant boolean := local_residency() = 'NEW';
  my_xid bigint;
  ledger_shard integer;
  peer text;  -- runops_peer_<k> for an environment on shard k >= 1; NULL: local, or runops_peer
  changed bigint;
  c record;
  judged record;
  passes integer := 0;
BEGIN
  IF NOT local_ledger THEN
    my_xid := pg_current_xact_id()::text::bigint;
    SELECT l.shard INTO ledger_shard FROM claim_ledger_shard(claim_idempotency_key.environment_id) AS l;
    IF ledger_shard IS NOT NULL THEN
      peer := shard_peer(ledger_shard, 'environment ' || input_prefix(claim_idempotency_key.environment_id));
    END IF;
  END IF;
  LOOP
    passes := passes + 1;
    IF passes > 8 THEN
      PERFORM raise_error('RO008', 'the idempotency claim kept changing under concurrent triggers; retry the same call');
    END IF;
    -- The local ledger needs no exception block (a block is a subtransaction on the hot path);
    -- the remote one turns a lost connection into RO009.
    IF local_ledger THEN
      INSERT INTO idempotency_claims AS l (environment_id, task_identifier, key_hash, run_id, claimant_xid,
                                          expires_at, claimed_at)
      VALUES (claim_idempotency_key.environment_id, claim_idempotency_key.task_identifier,
              claim_idempotency_key.key_hash, claim_idempotency_key.run_id, NULL,
              claim_idempotency_key.expires_at, ts)
      ON CONFLICT DO NOTHING;
      EXIT WHEN FOUND;  -- claimed
      SELECT l.run_id, l.claimant_xid, l.expires_at INTO c
      FROM idempotency_claims AS l
      WHERE l.environment_id = claim_idempotency_key.environment_id
        AND l.task_identifier = claim_idempotency_key.task_identifier AND l.key_hash = claim_idempotency_key.key_hash;
    ELSIF peer IS NULL THEN
      BEGIN
        INSERT INTO runops_peer.idempotency_claims (environment_id, task_identifier, key_hash, run_id, claimant_xid,
                                                    expires_at, claimed_at)
        VALUES (claim_idempotency_key.environment_id, claim_idempotency_key.task_identifier,
                claim_idempotency_key.key_hash, claim_idempotency_key.run_id, my_xid,
                claim_idempotency_key.expires_at, ts)
        ON CONFLICT DO NOTHING;
        EXIT WHEN FOUND;  -- claimed
        SELECT l.run_id, l.claimant_xid, l.expires_at INTO c
        FROM runops_peer.idempotency_claims AS l
        WHERE l.environment_id = claim_idempotency_key.environment_id
          AND l.task_identifier = claim_idempotency_key.task_identifier AND l.key_hash = claim_idempotency_key.key_hash;
      EXCEPTION WHEN connection_exception THEN
        PERFORM raise_error('RO009', 'the run-ops store, which keeps the idempotency claim ledger, is unavailable: '
                                     || SQLERRM);
      END;
    ELSE
      BEGIN
        EXECUTE format('INSERT INTO %I.idempotency_claims (environment_id, task_identifier, key_hash, run_id, '
                       'claimant_xid, expires_at, claimed_at) VALUES ($1, $2, $3, $4, $5, $6, $7) '
                       'ON CONFLICT DO NOTHING', peer)
        USING claim_idempotency_key.environment_id, claim_idempotency_key.task_identifier,
              claim_idempotency_key.key_hash, claim_idempotency_key.run_id, my_xid, claim_idempotency_key.expires_at,
              ts;
        GET DIAGNOSTICS changed = ROW_COUNT;
        EXIT WHEN changed > 0;  -- claimed
        EXECUTE format('SELECT l.run_id, l.claimant_xid, l.expires_at FROM %I.idempotency_claims AS l '
                       'WHERE l.environment_id = $1 AND l.task_identifier = $2 AND l.key_hash = $3', peer)
        INTO c USING claim_idempotency_key.environment_id, claim_idempotency_key.task_identifier,
                     claim_idempotency_key.key_hash;
      EXCEPTION WHEN connection_exception THEN
        PERFORM raise_error('RO009', format('run-ops shard %s, which keeps this environment''s idempotency claim '
                                            'ledger, is unavailable: %s', ledger_shard, SQLERRM));
      END;
    END IF;
    CONTINUE WHEN c.run_id IS NULL;  -- pruned meanwhile: claim again

    judged := judge_claim(claim_idempotency_key.environment_id, claim_idempotency_key.task_identifier,
                          claim_idempotency_key.key_hash, c.run_id, c.claimant_xid, c.expires_at, ts);
    IF judged.verdict = 'LIVE' THEN
      holder_id := c.run_id;
      holder_status := judged.holder_status;
      RETURN;
    ELSIF judged.verdict = 'PENDING' THEN
      PERFORM raise_error('RO008', 'another trigger with this idempotency key is committing in the other store; retry the same call');
    END IF;

    -- Dead: take the claim over, if nobody else did since we read it.
    IF local_ledger THEN
      UPDATE idempotency_claims AS l
      SET run_id = claim_idempotency_key.run_id, claimant_xid = NULL, expires_at = claim_idempotency_key.expires_at,
          claimed_at = ts
      WHERE l.environment_id = claim_idempotency_key.environment_id
        AND l.task_identifier = claim_idempotency_key.task_identifier AND l.key_hash = claim_idempotency_key.key_hash
        AND l.run_id = c.run_id;
      GET DIAGNOSTICS changed = ROW_COUNT;
    ELSIF peer IS NULL THEN
      BEGIN
        UPDATE runops_peer.idempotency_claims AS l
        SET run_id = claim_idempotency_key.run_id, claimant_xid = my_xid, expires_at = claim_idempotency_key.expires_at,
            claimed_at = ts
        WHERE l.environment_id = claim_idempotency_key.environment_id
          AND l.task_identifier = claim_idempotency_key.task_identifier AND l.key_hash = claim_idempotency_key.key_hash
          AND l.run_id = c.run_id;
        GET DIAGNOSTICS changed = ROW_COUNT;
      EXCEPTION WHEN connection_exception THEN
        PERFORM raise_error('RO009', 'the run-ops store, which keeps the idempotency claim ledger, is unavailable: '
                                     || SQLERRM);
      END;
    ELSE
      BEGIN
        EXECUTE format('UPDATE %I.idempotency_claims AS l SET run_id = $4, claimant_xid = $5, expires_at = $6, '
                       'claimed_at = $7 WHERE l.environment_id = $1 AND l.task_identifier = $2 AND l.key_hash = $3 '
                       'AND l.run_id = $8', peer)
        USING claim_idempotency_key.environment_id, claim_idempotency_key.task_identifier,
              claim_idempotency_key.key_hash, claim_idempotency_key.run_id, my_xid, claim_idempotency_key.expires_at,
              ts, c.run_id;
        GET DIAGNOSTICS changed = ROW_COUNT;
      EXCEPTION WHEN connection_exception THEN
        PERFORM raise_error('RO009', format('run-ops shard %s, which keeps this environment''s idempotency claim '
                                            'ledger, is unavailable: %s', ledger_shard, SQLERRM));
      END;
    END IF;
    IF changed > 0 THEN
      IF try_classify_bare(c.run_id) = local_residency() THEN
        PERFORM release_idempotency_keys(ARRAY[c.run_id], ARRAY[claim_idempotency_key.key_hash]);
      END IF;
      EXIT;  -- claimed
    END IF;
  END LOOP;
  -- Claimed, fresh or taken over: a live holder the ledger never named may still be adopted.
  SELECT * INTO holder_id, holder_status
  FROM adopt_unclaimed_holder(claim_idempotency_key.environment_id, claim_idempotency_key.task_identifier,
                              claim_idempotency_key.key_hash, claim_idempotency_key.run_id, ts);
END
$$;

-- Until the ledger holds every key (split_settings.claims_backfilled_at: a store upgraded from
-- r0001 with the split already enabled has keys no claim names), a claim just taken is checked
-- against the other store's runs: a live holder there, committed before the upgrade, is adopted —
-- the claim is turned to it — and returned. Once backfilled this is one settings read.
CREATE OR REPLACE FUNCTION runops.adopt_unclaimed_holder(environment_id text, task_identifier text, key_hash text,
                                                         run_id text, at timestamptz,
                                                         OUT holder_id text, OUT holder_status text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  h record;
  ledger_shard integer;
  peer text;
BEGIN
  IF (current_split_settings()).claims_backfilled_at IS NOT NULL THEN
    RETURN;
  END IF;
  IF local_residency() = 'LEGACY' THEN
    SELECT l.shard INTO ledger_shard FROM claim_ledger_shard(adopt_unclaimed_holder.environment_id) AS l;
    IF ledger_shard IS NOT NULL THEN
      peer := shard_peer(ledger_shard, 'environment ' || input_prefix(adopt_unclaimed_holder.environment_id));
    END IF;
  END IF;
  BEGIN
    IF peer IS NULL THEN
      SELECT r.id, r.status, r.idempotency_key_expires_at AS expires_at INTO h
      FROM runops_peer.runs AS r
      WHERE r.environment_id = adopt_unclaimed_holder.environment_id
        AND r.task_identifier = adopt_unclaimed_holder.task_identifier
        AND r.idempotency_key_hash = adopt_unclaimed_holder.key_hash;
    ELSE
      EXECUTE format('SELECT r.id, r.status, r.idempotency_key_expires_at AS expires_at FROM %I.runs AS r '
                     'WHERE r.environment_id = $1 AND r.task_identifier = $2 AND r.idempotency_key_hash = $3', peer)
      INTO h USING adopt_unclaimed_holder.environment_id, adopt_unclaimed_holder.task_identifier,
                   adopt_unclaimed_holder.key_hash;
    END IF;
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', 'the other store is unavailable to check a key that predates the claim ledger: '
                                 || SQLERRM, NULL, 'run `runops migrate` to backfill the ledger');
  END;
  IF h.id IS NULL OR idempotency_key_is_dead(h.status, h.expires_at, at) THEN
    RETURN;
  END IF;
  IF local_residency() = 'NEW' THEN
    UPDATE idempotency_claims AS l SET run_id = h.id, claimant_xid = NULL, expires_at = h.expires_at
    WHERE l.environment_id = adopt_unclaimed_holder.environment_id
      AND l.task_identifier = adopt_unclaimed_holder.task_identifier
      AND l.key_hash = adopt_unclaimed_holder.key_hash AND l.run_id = adopt_unclaimed_holder.run_id;
  ELSIF peer IS NULL THEN
    UPDATE runops_peer.idempotency_claims AS l SET run_id = h.id, claimant_xid = NULL, expires_at = h.expires_at
    WHERE l.environment_id = adopt_unclaimed_holder.environment_id
      AND l.task_identifier = adopt_unclaimed_holder.task_identifier
      AND l.key_hash = adopt_unclaimed_holder.key_hash AND l.run_id = adopt_unclaimed_holder.run_id;
  ELSE
    EXECUTE format('UPDATE %I.idempotency_claims AS l SET run_id = $5, claimant_xid = NULL, expires_at = $6 '
                   'WHERE l.environment_id = $1 AND l.task_identifier = $2 AND l.key_hash = $3 AND l.run_id = $4',
                   peer)
    USING adopt_unclaimed_holder.environment_id, adopt_unclaimed_holder.task_identifier,
          adopt_unclaimed_holder.key_hash, adopt_unclaimed_holder.run_id, h.id, h.expires_at;
  END IF;
  holder_id := h.id;
  holder_status := h.status;
END
$$;

-- `runops migrate`, after wiring, on the run-ops store first and then on the control plane: the
-- claims a store upgraded from r0001 lacks. The run-ops store claims its own live keyed runs;
-- the control plane claims its own through the FDW under the split gate (as enable_split does)
-- and marks the ledger complete, which reaches run-ops through the mirror. Idempotent; 0 when
-- there is nothing to do (the split never enabled, or the ledger already complete).
CREATE OR REPLACE FUNCTION runops.complete_claims_backfill()
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  s split_settings := current_split_settings();
  ts timestamptz := now();
  n bigint := 0;
BEGIN
  IF NOT s.ever_enabled OR s.claims_backfilled_at IS NOT NULL THEN
    RETURN 0;
  END IF;
  IF local_residency() = 'NEW' THEN
    INSERT INTO idempotency_claims AS l (environment_id, task_identifier, key_hash, run_id, claimant_xid,
                                        expires_at, claimed_at)
    SELECT r.environment_id, r.task_identifier, r.idempotency_key_hash, r.id, NULL, r.idempotency_key_expires_at, ts
    FROM runs AS r
    WHERE r.idempotency_key_hash IS NOT NULL AND NOT idempotency_key_is_dead(r.status, r.idempotency_key_expires_at, ts)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
  END IF;
  PERFORM pg_advisory_xact_lock(1919250031, 1);
  n := backfill_claims();
  UPDATE split_settings SET claims_backfilled_at = now(), updated_at = now();
  RETURN n;
END
$$;

-- enable_split, first time only: claims for every live key held by a run of this store, so the
-- run-ops store never has to ask the control plane about keys that predate the split. Runs under
-- the gate lock (lock_key_claim) so no unclaimed keyed run commits after it. claimant_xid is this
-- transaction: a reader that sees it finished also sees every run it names. Each key goes to the
-- ledger of its environment's shard, as claim_idempotency_key's claims do.
CREATE OR REPLACE FUNCTION runops.backfill_claims()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  n bigint;
  more bigint;
  other record;
BEGIN
  INSERT INTO runops_peer.idempotency_claims (environment_id, task_identifier, key_hash, run_id, claimant_xid,
                                              expires_at, claimed_at)
  SELECT r.environment_id, r.task_identifier, r.idempotency_key_hash, r.id, pg_current_xact_id()::text::bigint,
         r.idempotency_key_expires_at, ts
  FROM runs AS r
  WHERE r.idempotency_key_hash IS NOT NULL
    AND NOT idempotency_key_is_dead(r.status, r.idempotency_key_expires_at, ts)
    AND NOT EXISTS (SELECT FROM claim_ledger_shard(r.environment_id))
  ON CONFLICT DO NOTHING;
  GET DIAGNOSTICS n = ROW_COUNT;
  FOR other IN
    SELECT l.shard, min(r.environment_id) AS environment_id
    FROM runs AS r CROSS JOIN LATERAL claim_ledger_shard(r.environment_id) AS l
    WHERE r.idempotency_key_hash IS NOT NULL
      AND NOT idempotency_key_is_dead(r.status, r.idempotency_key_expires_at, ts)
    GROUP BY l.shard ORDER BY l.shard
  LOOP
    EXECUTE format('INSERT INTO %I.idempotency_claims (environment_id, task_identifier, key_hash, run_id, '
                   'claimant_xid, expires_at, claimed_at) '
                   'SELECT r.environment_id, r.task_identifier, r.idempotency_key_hash, r.id, '
                   'pg_catalog.pg_current_xact_id()::text::bigint, r.idempotency_key_expires_at, $2 '
                   'FROM runops.runs AS r CROSS JOIN LATERAL runops.claim_ledger_shard(r.environment_id) AS l '
                   'WHERE l.shard = $1 AND r.idempotency_key_hash IS NOT NULL '
                   'AND NOT runops.idempotency_key_is_dead(r.status, r.idempotency_key_expires_at, $2) '
                   'ON CONFLICT DO NOTHING',
                   shard_peer(other.shard, 'environment ' || input_prefix(other.environment_id)))
    USING other.shard, ts;
    GET DIAGNOSTICS more = ROW_COUNT;
    n := n + more;
  END LOOP;
  RETURN n;
EXCEPTION WHEN connection_exception THEN
  PERFORM raise_error('RO007', 'split refused: the run-ops store is unreachable for the idempotency claim backfill: '
                               || SQLERRM);
  RETURN 0;
END
$$;

-- Claims whose key expired a day ago name no live holder (a takeover would have rewritten them):
-- pruned in bounded batches by tick on the run-ops store.
CREATE OR REPLACE FUNCTION runops.prune_claims(max_rows integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  n integer;
BEGIN
  DELETE FROM idempotency_claims AS l
  WHERE l.ctid = ANY (ARRAY(SELECT x.ctid FROM idempotency_claims AS x
                            WHERE x.expires_at < now() - interval '1 day'
                            ORDER BY x.expires_at LIMIT max_rows FOR UPDATE SKIP LOCKED));
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Batch items (add_batch_items): the same claims, for every keyed position that is about to
-- create a run. Returns, position by position, the live holder a position must take instead
-- (NULL where this call now holds the key, or the position creates nothing). On the run-ops store
-- one INSERT claims every key the ledger lacks and only the conflicts go through the single-key
-- path; on the control plane each key goes through the single-key path (one FDW round trip each,
-- under its lock, locks taken in key order so two batches never deadlock).
CREATE OR REPLACE FUNCTION runops.claim_batch_keys(environment_id text, tasks text[], hashes text[], run_ids text[],
                                                   creates boolean[], expires timestamptz[])
RETURNS text[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
BEGIN
  IF local_residency() = 'NEW' AND (current_split_settings()).claims_backfilled_at IS NOT NULL THEN
    -- (Before the ledger is complete every key goes through the single path, which checks the
    -- other store for a holder that predates the ledger.)
    INSERT INTO idempotency_claims AS l (environment_id, task_identifier, key_hash, run_id, claimant_xid,
                                        expires_at, claimed_at)
    SELECT claim_batch_keys.environment_id, w.t, w.h, w.r, NULL, w.x, ts
    FROM unnest(tasks, hashes, run_ids, creates, expires) AS w(t, h, r, c, x)
    WHERE w.c AND w.h IS NOT NULL
    ON CONFLICT DO NOTHING;
  ELSIF local_residency() = 'LEGACY' THEN
    PERFORM pg_advisory_xact_lock_shared(1919250031, 1);
    PERFORM pg_advisory_xact_lock(hashtextextended(claim_batch_keys.environment_id || '/' || k.t || '/' || k.h, 0))
    FROM (SELECT DISTINCT w.t, w.h FROM unnest(tasks, hashes, creates) AS w(t, h, c)
          WHERE w.c AND w.h IS NOT NULL ORDER BY 1, 2) AS k;
  END IF;
  -- A position whose claim names its own new run holds the key; any other keyed creator asks
  -- the single-key path (which judges, takes over, or answers the live holder).
  RETURN ARRAY(
    SELECT CASE WHEN w.c AND w.h IS NOT NULL AND mine.run_id IS DISTINCT FROM w.r
                THEN (claim_idempotency_key(claim_batch_keys.environment_id, w.t, w.h, w.x, w.r)).holder_id
           END
    FROM unnest(tasks, hashes, run_ids, creates, expires) WITH ORDINALITY AS w(t, h, r, c, x, k)
    LEFT JOIN LATERAL (SELECT l.run_id FROM idempotency_claims AS l
                       WHERE local_residency() = 'NEW' AND w.c AND w.h IS NOT NULL
                         AND l.environment_id = claim_batch_keys.environment_id AND l.task_identifier = w.t
                         AND l.key_hash = w.h) AS mine ON true
    ORDER BY w.k);
END
$$;
