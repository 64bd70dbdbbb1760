-- Residency: which store an id belongs to, a pure function of its shape (SPEC §2).
--
--   try_classify_residency / classify_residency  public: LEGACY, NEW, or NULL / RO001
--   local_residency        this store's residency (a constant rendered per store at install)
--   store_for_residency    LEGACY -> CONTROL_PLANE, NEW -> RUN_OPS
--   bare_id                a caller's id without its friendly prefix (NULL for another kind's)
--   friendly_ids           bare ids with their prefix, for a public function to return
--   try_classify_bare / classify_bare   the residency of a bare id
--   require_id             the id a write names: RO006 for a bad one, RO001 for no shape
--   refuse_foreign_id      a write naming the other store's row: RO002 (or RO004 before any split)
--   require_local_id       the same, of a row this store holds: RO002 (or RO004) for the other's
--
-- Ids are bare inside SQL; the friendly prefix is stripped where a public function takes an id
-- (bare_id, require_id) and added where it returns one.

-- Residency is a pure function of the id's shape. An optional friendly prefix (^[a-z]+_) is
-- stripped once; a bare 25-char cuid is LEGACY, a bare 27-char base62 KSUID within the KSUID
-- range is NEW, anything else is unclassifiable (NULL here).
CREATE OR REPLACE FUNCTION runops.try_classify_residency(id text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT CASE
           WHEN pg_catalog.regexp_replace(id, '^[a-z]+_', '') ~ '^c[0-9a-z]{24}$' THEN 'LEGACY'
           WHEN pg_catalog.regexp_replace(id, '^[a-z]+_', '') ~ '^[0-9A-Za-z]{27}$'
            AND pg_catalog.regexp_replace(id, '^[a-z]+_', '') COLLATE "C" <= 'aWgEPTl1tmebfsQzFP4bxwgy80V'
             THEN 'NEW'
         END
$$;

CREATE OR REPLACE FUNCTION runops.classify_residency(id text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  residency text := runops.try_classify_residency(id);
BEGIN
  IF residency IS NULL THEN
    RAISE EXCEPTION 'unclassifiable id %: expected a 25-character cuid or a 27-character KSUID, optionally with a friendly prefix such as run_', pg_catalog.quote_nullable(runops.input_prefix(id))
      USING ERRCODE = 'RO001';
  END IF;
  RETURN residency;
END
$$;

-- The residency of rows this store holds. Rendered per store at install, like the id-shape
-- CHECK: a constant PostgreSQL folds into every plan, where reading store_config would cost a
-- query on each trigger.
CREATE OR REPLACE FUNCTION runops.local_residency()
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT 'RESIDENCY_OF_THIS_STORE'::text
$$;

CREATE OR REPLACE FUNCTION runops.store_for_residency(residency text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT CASE residency WHEN 'LEGACY' THEN 'CONTROL_PLANE' ELSE 'RUN_OPS' END
$$;

-- Strips the friendly prefix of a caller's id. NULL when the id carries another kind's prefix
-- (a batch id passed as a run id): reads answer "no row" for it, writes raise RO006.
CREATE OR REPLACE FUNCTION runops.bare_id(id text, kind text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT CASE
           WHEN id !~ '^[a-z]+_' THEN id
           WHEN starts_with(id, kind || '_') THEN substr(id, length(kind) + 2)
         END
$$;

-- The other direction, at the public edge: bare ids as a caller sees them (kind_<id>), in order.
CREATE OR REPLACE FUNCTION runops.friendly_ids(ids text[], kind text)
RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$
  SELECT ARRAY(SELECT kind || '_' || u.id FROM unnest(ids) WITH ORDINALITY AS u(id, n) ORDER BY u.n)
$$;

-- The residency of an id whose friendly prefix is already stripped: only the first prefix is
-- ever stripped, so "run_run_c..." is unclassifiable rather than a cuid.
CREATE OR REPLACE FUNCTION runops.try_classify_bare(bare text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT CASE WHEN bare ~ '^[a-z]+_' THEN NULL ELSE try_classify_residency(bare) END
$$;

CREATE OR REPLACE FUNCTION runops.classify_bare(bare text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  residency text := try_classify_bare(bare);
BEGIN
  IF residency IS NULL THEN
    PERFORM raise_error('RO001', format('unclassifiable id %s: expected a 25-character cuid or a 27-character KSUID, '
                                        'optionally with one friendly prefix such as run_',
                                        quote_nullable(input_prefix(bare))));
  END IF;
  RETURN residency;
END
$$;

-- The id a write names: RO006 when missing or of the wrong kind, RO001 when unclassifiable.
CREATE OR REPLACE FUNCTION runops.require_id(id text, kind text, what text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  bare text := bare_id(id, kind);
BEGIN
  IF id IS NULL OR id = '' THEN
    PERFORM raise_error('RO006', format('%s is required', what));
  END IF;
  IF bare IS NULL THEN
    PERFORM raise_error('RO006', format('%s %s is not a %s id', what, input_prefix(id), kind),
                        NULL, format('pass the bare id or the friendly form %s_<id>', kind));
  END IF;
  PERFORM classify_bare(bare);
  RETURN bare;
END
$$;

-- A write naming a row of the other store: RO002 naming the owner, or RO004 for a NEW id while
-- the split was never enabled (no run-ops store holds anything yet).
CREATE OR REPLACE FUNCTION runops.refuse_foreign_id(residency text, what text, id text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF residency = 'NEW' AND NOT (current_split_settings()).ever_enabled THEN
    PERFORM raise_error('RO004', format('%s %s not found (the split was never enabled)', what, input_prefix(id)));
  END IF;
  PERFORM raise_wrong_store(what, id, store_for_residency(residency));
END
$$;

-- The id a write names, of a row this store must hold: require_id's refusals, then RO002 naming
-- the owning store (RO004 for a NEW id before any split) for the other store's. Returns it bare.
-- The one opening of lock_run, cancel_run, complete_waitpoint and lock_batch.
CREATE OR REPLACE FUNCTION runops.require_local_id(id text, kind text, what text)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  bare text := require_id(id, kind, what);
  -- require_id has classified it: the inlined try_ form cannot be NULL here.
  residency text := try_classify_bare(bare);
BEGIN
  IF residency <> local_residency() THEN
    PERFORM refuse_foreign_id(residency, kind, id);
  ELSIF residency = 'NEW' THEN
    -- shards.sql: a NEW id of another shard is RO002. Its own statements, not a predicate in
    -- this one: a query holding the id's decoding is planned afresh on every call (custom plans
    -- win once the decoding folds to a constant), ~200 µs a call even with one shard.
    PERFORM refuse_other_shard(bare, kind, id);
  END IF;
  RETURN bare;
END
$$;
