-- Idempotency in one store (SPEC §4): the dedup key, when a held key is dead, and its release.
-- What a valid key is lives with the other bounds (idempotency_key_is_valid, bounded_input.sql);
-- "cached, dead (released), or create" is decided by find_or_create_run (trigger_run.sql) for one
-- run and add_batch_items (batches.sql) for a chunk. Across both stores the claim ledger
-- (claims.sql) stands beside it.
--
--   idempotency_key_hash     the dedup key, exactly as the SPEC writes it
--   idempotency_key_expired  the expiry rule, which batch and waitpoint keys follow too
--   idempotency_key_is_dead  expired, or its run ended in a status that releases it (run_statuses)
--   release_idempotency_keys the one release of run keys: dead ones, a reset, an expiry
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
  PERFORM require_valid_idempotency_key(reset_idempotency_key.idempotency_key, 'idempotency_key');
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
