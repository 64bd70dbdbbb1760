"""r0004_speed: generated from sql/ by `python -m runops.ops.revision r0004_speed`. Do not edit by hand.

Both histories apply this text; RESIDENCY_CHECK(col) becomes each store's id-shape CHECK and
RESIDENCY_OF_THIS_STORE its residency.
"""

import re

RESIDENCY_CHECKS = {'CONTROL_PLANE': "{col} ~ '^c[0-9a-z]{{24}}$'", 'RUN_OPS': "{col} ~ '^[0-9A-Za-z]{{27}}$' AND {col} <= 'aWgEPTl1tmebfsQzFP4bxwgy80V'"}

RESIDENCIES = {'CONTROL_PLANE': 'LEGACY', 'RUN_OPS': 'NEW'}

SEEDS = {'CONTROL_PLANE': '', 'RUN_OPS': ''}

SQL = r'''
SET LOCAL search_path = runops, pg_catalog, pg_temp;
SET LOCAL check_function_bodies = off;
-- sql/upgrades/r0004_speed/10_structure.sql
-- r0004, issue 10: one home per rule. The range checks require_max_rows (tick.sql) and
-- require_attempt_number (lifecycle.sql) are now require_between (bounded_input.sql); the
-- function files re-applied after this one call it instead.
DROP FUNCTION runops.require_max_rows(integer, text);
DROP FUNCTION runops.require_attempt_number(integer);

-- sql/upgrades/r0004_speed/20_batches.sql
-- r0004, issue 11 item 2: batch membership in runs, no foreign keys to batches on the hot path
-- (SPEC §4 and §5 [1.2]; docs/decisions.md "Batches").
--
-- A run a batch created is a member through its own runs.batch_id/batch_index; batch_items keeps
-- only cached items (an index resolved to a run not created for it). The foreign keys
-- runs.batch_id -> batches and batch_items.batch_id -> batches go: the functions keep those
-- invariants, `runops doctor --deep` checks them.
--
-- Locks: dropping a foreign key takes ACCESS EXCLUSIVE on both its tables, and the index build
-- and the move below need runs and batch_items still. All three are taken at once, 200 ms at a
-- time with a retry (as r0002 and r0003 do), so the upgrade never queues every trigger behind a
-- lock it is itself waiting for; a batch writer holds runs, batches and batch_items together, so
-- taking them one by one could deadlock with it.
DO $$
DECLARE
  previous text := current_setting('lock_timeout');
  attempts integer := 0;
BEGIN
  LOOP
    BEGIN
      PERFORM set_config('lock_timeout', '200ms', true);
      LOCK TABLE runops.runs, runops.batches, runops.batch_items IN ACCESS EXCLUSIVE MODE;
      PERFORM set_config('lock_timeout', previous, true);
      RETURN;
    EXCEPTION WHEN lock_not_available THEN
      attempts := attempts + 1;
      IF attempts >= 600 THEN
        RAISE EXCEPTION 'r0004 could not lock runops.runs, runops.batches and runops.batch_items in %s attempts: too busy to upgrade now', attempts;
      END IF;
      PERFORM pg_sleep(0.01 + random() * 0.04);
    END;
  END LOOP;
END
$$;

ALTER TABLE runops.runs DROP CONSTRAINT runs_batch_id_fkey;
ALTER TABLE runops.batch_items DROP CONSTRAINT batch_items_batch_id_fkey;

-- Unique: every writer fills an index under the batch's row lock, after reading the index's
-- members, so no store can hold two created runs at one index (a violation here means the
-- store was already inconsistent, and the upgrade stops with it).
CREATE UNIQUE INDEX runs_batch_member_idx ON runops.runs (batch_id, batch_index) WHERE batch_id IS NOT NULL;

-- Every run with a batch_id was written with its batch_index and attached at that index in the
-- same transaction (admit_run, add_batch_items), so each has a batch_items row naming it at its
-- own index. Checked rather than assumed: a run naming a batch without such a row would become
-- a member it was not, so the upgrade refuses instead.
DO $$
DECLARE
  strays bigint;
BEGIN
  SELECT count(*) INTO strays FROM runops.runs AS r
  WHERE r.batch_id IS NOT NULL
    AND NOT EXISTS (SELECT FROM runops.batch_items AS i
                    WHERE i.batch_id = r.batch_id AND i.item_index = r.batch_index AND i.run_id = r.id);
  IF strays > 0 THEN
    RAISE EXCEPTION 'r0004: % runs name a batch without being its item at their batch_index; nothing was changed', strays
      USING HINT = 'SELECT id, batch_id, batch_index FROM runops.runs lists them; ask the runops maintainers before upgrading';
  END IF;
END
$$;

-- Move the created runs' membership out: their batch_items rows say again what the run row
-- says. What remains are cached items only, the one rule the functions read.
DELETE FROM runops.batch_items AS i
USING runops.runs AS r
WHERE r.id = i.run_id AND r.batch_id = i.batch_id AND r.batch_index = i.item_index;

-- sql/upgrades/r0004_speed/30_duplicates.sql
-- r0004, issue 10: one implementation per rule (the duplicates pass). Functions folded into one
-- helper each are dropped here; the function files re-applied after this carry their callers.
--   require_lease  -> lock_leased_run (lifecycle.sql): the opening of heartbeat_run and start_attempt
DROP FUNCTION runops.require_lease(runops.runs, text, text);

-- sql/upgrades/r0004_speed/40_renamed.sql
-- r0004, issue 10: ids are bare inside SQL. Three internal functions now answer bare ids where
-- they answered friendly ones, so they carry new names: a function that keeps its name and
-- signature but changes its answer would be picked up by a call already running the previous
-- revision's caller when this upgrade commits (PostgreSQL takes no lock on a function), and that
-- caller would hand a bare id to its client. With the old names dropped, such a call fails
-- instead (undefined function), and nothing it did is kept.
--   create_run           -> find_or_create_run  (sql/functions/idempotency.sql)
--   admit_run            -> admit_new_run       (sql/functions/trigger_run.sql)
--   complete_local_edges -> resume_local_waiters (sql/functions/waitpoints.sql)
DROP FUNCTION runops.create_run(runops.environment_context, runops.runs, text, jsonb, runops.trigger_spec, text, jsonb);
DROP FUNCTION runops.admit_run(text, text, jsonb, jsonb, text, jsonb);
DROP FUNCTION runops.complete_local_edges(text);

-- sql/functions/batches.sql
-- Batches: many runs triggered together, and a BATCH waitpoint that completes when they all
-- have finished.
--
--   batch_trigger       one call: the batch, sealed, with all its runs
--   create_batch        an open batch (PENDING) expecting N items ...
--   append_batch_items  ... streamed in chunks; a re-sent index keeps its first content ...
--   seal_batch          ... then sealed (PROCESSING) once all N are there
-- Items follow exactly the single-trigger idempotency rules (dead keys make new runs; one run
-- per key, even for duplicates inside one batch). final_count counts items whose run is final;
-- when it reaches expected_count on a sealed batch, the batch is COMPLETED and its waitpoint
-- (the batch's own id) completes with [{index, run_id, status}]. Open batches past their seal
-- timeout are ABORTED by tick.
--
-- Membership (index -> run) lives in two places (SPEC §4 [1.2], docs/decisions.md "Batches"):
-- a run the batch created carries it in runs.batch_id/batch_index; only an index resolved to a
-- run the batch did not create for it (a cached key, a duplicate key inside the batch, a holder
-- in the other store) has a batch_items row. Every index is in exactly one of the two, and
-- batch_members() is the one reader of both.

-- A batch's members with an index in [lo, hi], in index order. Plain SQL, so PostgreSQL
-- inlines it into each caller's plan (an index range scan of each side, merged).
CREATE OR REPLACE FUNCTION runops.batch_members(batch_bare_id text, lo integer, hi integer)
RETURNS TABLE (item_index integer, run_id text)
LANGUAGE sql STABLE
AS $$
  SELECT m.item_index, m.run_id
  FROM (SELECT r.batch_index AS item_index, r.id AS run_id FROM runops.runs AS r
        WHERE r.batch_id = $1 AND r.batch_index BETWEEN $2 AND $3
        UNION ALL
        SELECT i.item_index, i.run_id FROM runops.batch_items AS i
        WHERE i.batch_id = $1 AND i.item_index BETWEEN $2 AND $3) AS m
  ORDER BY m.item_index
$$;

CREATE OR REPLACE FUNCTION runops.batch_row_of(b runops.batches)
RETURNS runops.batch_row
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  result batch_row;
BEGIN
  result := ROW('batch_' || b.id, b.environment_id, b.status, b.expected_count, b.item_count,
                ARRAY(SELECT 'run_' || m.run_id FROM batch_members(b.id, 0, b.expected_count - 1) AS m),
                b.status <> 'PENDING', b.created_at, b.completed_at, b.idempotency_key);
  RETURN result;
END
$$;

-- The batch a write names: RO006/RO001 for a bad id, RO002 for another store's, then
-- lock_bare_batch.
CREATE OR REPLACE FUNCTION runops.lock_batch(batch_id text)
RETURNS runops.batches
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  RETURN lock_bare_batch(require_local_id(batch_id, 'batch', 'batch_id'));
END
$$;

-- A batch of this store by its bare id, locked: appends, seals and completions of one batch take
-- turns. RO004 when missing.
CREATE OR REPLACE FUNCTION runops.lock_bare_batch(batch_id text)
RETURNS runops.batches
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  b batches;
BEGIN
  SELECT * INTO b FROM batches AS x WHERE x.id = lock_bare_batch.batch_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('batch batch_%s not found', lock_bare_batch.batch_id));
  END IF;
  RETURN b;
END
$$;

CREATE OR REPLACE FUNCTION runops.add_batch_items(b runops.batches, env runops.environment_context,
                                                  first_index integer, items jsonb)
RETURNS text[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  parent runs;
  item_idx integer[];
  item_task text[];
  item_payload jsonb[];
  item_spec trigger_spec[];
  item_key text[];
  item_key_ttl interval[];
  item_hash text[];
  item_run text[];          -- the run each position resolves to, filled pass by pass
  item_creates boolean[];   -- positions that create a run in this pass
  item_creator bigint[];    -- for each position, the position creating its run
  item_made boolean[];      -- positions whose run this call made (when it made them all at once)
  item_own boolean[];       -- positions whose run was created for them (a member through runs)
  holders text[];           -- per position, the live holder of its key in either store (claims)
  creator_count bigint;
  inserted bigint;
  dead_ids text[];
  dead_hashes text[];
  has_keys boolean;
  new_ids text[];
  passes integer := 0;
  default_ttl interval;
  all_item_count integer := jsonb_array_length(items);
  resent boolean;
BEGIN
  IF b.parent_run_id IS NOT NULL THEN
    SELECT * INTO parent FROM runs AS r WHERE r.id = b.parent_run_id;
  END IF;
  default_ttl := coalesce(b.idempotency_key_expires_at - b.created_at, default_idempotency_key_ttl());

  -- 3. Every new index as (index, task, payload, key, dedup hash, spec), in parallel arrays.
  --    Items without a key of their own use the batch key plus their index (and the batch's key
  --    TTL). Only rich items carry a parsed spec; the INSERT fills the defaults for the rest.
  --    Statements below unnest the arrays together rather than subscript them: subscripting an
  --    array of text walks it from the start, which is quadratic over a 10,000-item batch.
  resent := EXISTS (SELECT FROM batch_members(b.id, first_index, first_index + all_item_count - 1));

  -- The common case, fast: a chunk of new indexes with no key anywhere (no batch key, no item
  -- key: `@?` answers that in one jsonpath walk) makes one new run per item, each a member
  -- through its own row. One INSERT straight from the JSON, ids zipped by position (ROWS FROM,
  -- never a join of two function scans), no resolution passes and no batch_items.
  IF NOT resent AND b.idempotency_key IS NULL AND NOT (items @? '$[*].options.idempotency_key') THEN
    new_ids := mint_ids(all_item_count);
    INSERT INTO runs
    SELECT n.*
    -- OFFSET 0: each item's spec is parsed once, not once per column that reads it.
    FROM (SELECT e.n - 1 + first_index AS i, e.nid, e.item ->> 'task' AS t,
                 coalesce(e.item -> 'payload', '{}'::jsonb) AS p,
                 CASE WHEN coalesce(nullif(e.item -> 'options', 'null'::jsonb), '{}'::jsonb) = '{}'::jsonb THEN NULL
                      ELSE parse_trigger_options(e.item -> 'options') END AS spec
          FROM ROWS FROM (jsonb_array_elements(items), unnest(new_ids)) WITH ORDINALITY AS e(item, nid, n)
          OFFSET 0) AS x
    CROSS JOIN LATERAL new_run(x.nid, env, parent, b.id, x.i::integer, x.t, x.p, x.spec,
                               CASE WHEN (x.spec).delay_until > ts THEN 'DELAYED' ELSE 'PENDING' END,
                               NULL, NULL, NULL, NULL, ts) AS n;
    PERFORM count_attached(b.id, all_item_count, '{}'::text[]);
    RETURN friendly_ids(new_ids, 'run');
  END IF;
  SELECT array_agg(x.idx ORDER BY x.idx), array_agg(x.task ORDER BY x.idx), array_agg(x.payload ORDER BY x.idx),
         array_agg(x.key ORDER BY x.idx),
         array_agg(CASE WHEN x.key IS NOT NULL
                        THEN idempotency_key_hash(x.key, coalesce((x.spec).idempotency_key_scope, 'run'),
                                                  b.parent_run_id,
                                                  coalesce((x.spec).parent_attempt_number, parent.attempt_number))
                   END ORDER BY x.idx),
         array_agg(x.spec ORDER BY x.idx),
         -- An item's own key lives the default TTL (or its own); a key derived from the batch
         -- key lives as long as the batch key.
         array_agg(coalesce((x.spec).idempotency_key_ttl,
                            CASE WHEN x.own_key THEN default_idempotency_key_ttl() ELSE default_ttl END) ORDER BY x.idx)
  INTO item_idx, item_task, item_payload, item_key, item_hash, item_spec, item_key_ttl
  FROM (
    SELECT y.idx, y.task, y.payload, coalesce(y.opts ->> 'idempotency_key', b.idempotency_key || '-' || y.idx) AS key,
           y.opts ? 'idempotency_key' AS own_key,
           CASE WHEN y.opts - 'idempotency_key' = '{}'::jsonb THEN NULL
                WHEN y.opts ? 'idempotency_key' OR b.idempotency_key IS NULL
                THEN parse_trigger_options(y.opts)
                ELSE parse_trigger_options(y.opts || jsonb_build_object(
                       'idempotency_key', b.idempotency_key || '-' || y.idx,
                       'idempotency_key_ttl', coalesce(y.opts ->> 'idempotency_key_ttl', duration_text(default_ttl))))
           END AS spec
    FROM (SELECT e.n - 1 + first_index AS idx, e.item ->> 'task' AS task,
                 coalesce(e.item -> 'payload', '{}'::jsonb) AS payload,
                 coalesce(nullif(e.item -> 'options', 'null'::jsonb), '{}'::jsonb) AS opts
          FROM jsonb_array_elements(items) WITH ORDINALITY AS e(item, n)
          WHERE NOT resent
             OR NOT EXISTS (SELECT FROM batch_members(b.id, e.n::integer - 1 + first_index,
                                                     e.n::integer - 1 + first_index))) AS y
    -- OFFSET 0: each spec is built once, and idempotency_key_hash sees plain columns (so
    -- PostgreSQL inlines it instead of calling it per item).
    OFFSET 0
  ) AS x;

  IF item_idx IS NOT NULL THEN
    item_run := array_fill(NULL::text, ARRAY[cardinality(item_idx)]);
    item_own := array_fill(false, ARRAY[cardinality(item_idx)]);
    has_keys := EXISTS (SELECT FROM unnest(item_hash) AS h WHERE h IS NOT NULL);

    -- 4. Keys, as a single trigger resolves them: a live holder is reused, a dead one lets go,
    --    and a missing key gets one new run (created by the first index holding it). Unkeyed
    --    items each get a new run. A key a concurrent trigger takes meanwhile shows up as a
    --    holder on the next pass.
    --    Every statement walks the position-aligned arrays with one multi-argument unnest, and
    --    reaches runs only through index probes: a join between two unnest() sets is planned
    --    for a handful of rows and becomes quadratic over 10,000.
    LOOP
      passes := passes + 1;
      IF passes > 8 THEN
        PERFORM raise_error('RO008', 'batch items kept conflicting with concurrent triggers; retry the same call');
      END IF;
      -- Holders of the keys still open, in one probe each; a dead holder lets go of its key.
      -- (A chunk without keys has nothing to look up.)
      IF has_keys THEN
        -- A holder this call created for this very index (an earlier pass's insert that went
        -- in while another conflicted) is the position's own run, a member through runs.
        SELECT array_agg(CASE WHEN holder.dead THEN NULL ELSE coalesce(w.run, holder.id) END ORDER BY w.k),
               array_agg(w.own OR (holder.own AND NOT holder.dead) IS TRUE ORDER BY w.k),
               array_agg(holder.id) FILTER (WHERE holder.dead), array_agg(w.h) FILTER (WHERE holder.dead)
        INTO item_run, item_own, dead_ids, dead_hashes
        FROM unnest(item_task, item_hash, item_run, item_idx, item_own) WITH ORDINALITY AS w(t, h, run, i, own, k)
        LEFT JOIN LATERAL (SELECT r.id, idempotency_key_is_dead(r.status, r.idempotency_key_expires_at, ts) AS dead,
                                  r.batch_id IS NOT DISTINCT FROM b.id AND r.batch_index IS NOT DISTINCT FROM w.i AS own
                           FROM runs AS r
                           WHERE w.run IS NULL AND w.h IS NOT NULL AND r.environment_id = env.id
                             AND r.task_identifier = w.t AND r.idempotency_key_hash = w.h) AS holder ON true;
        IF dead_ids IS NOT NULL THEN
          PERFORM release_idempotency_keys(dead_ids, dead_hashes);
        END IF;
      END IF;
      -- Creators: unresolved positions, the first one per (task, key); every unkeyed one. Each
      -- unresolved position also learns which position creates its run.
      SELECT array_agg(x.k = x.first AND x.run IS NULL ORDER BY x.k), array_agg(x.first ORDER BY x.k),
             count(*) FILTER (WHERE x.k = x.first AND x.run IS NULL)
      INTO item_creates, item_creator, creator_count
      FROM (SELECT w.k, w.run,
                   CASE WHEN w.h IS NULL THEN w.k
                        ELSE min(w.k) OVER (PARTITION BY w.t, w.h, w.run IS NULL) END AS first
            FROM unnest(item_task, item_hash, item_run) WITH ORDINALITY AS w(t, h, run, k)) AS x;
      EXIT WHEN creator_count = 0;
      new_ids := mint_ids(cardinality(item_idx));  -- one per position; non-creators' go unused
      -- Across the seam (SPEC §6): keyed creators claim their keys; a key with a live holder in
      -- either store resolves its whole group to that holder, which then creates nothing.
      IF has_keys AND keyed_claims_required(env) THEN
        holders := claim_batch_keys(env.id, item_task, item_hash, new_ids, item_creates,
                                    ARRAY(SELECT ts + x FROM unnest(item_key_ttl) AS x));
        IF EXISTS (SELECT FROM unnest(holders) AS x WHERE x IS NOT NULL) THEN
          SELECT array_agg(coalesce(x.run, x.group_holder) ORDER BY x.k),
                 array_agg(x.creates AND x.holder IS NULL ORDER BY x.k),
                 count(*) FILTER (WHERE x.creates AND x.holder IS NULL)
          INTO item_run, item_creates, creator_count
          FROM (SELECT w.k, w.run, w.creates, w.holder,
                       CASE WHEN w.run IS NULL AND w.h IS NOT NULL
                            THEN max(w.holder) OVER (PARTITION BY w.t, w.h, w.run IS NULL) END AS group_holder
                FROM unnest(item_task, item_hash, item_run, item_creates, holders)
                       WITH ORDINALITY AS w(t, h, run, creates, holder, k)) AS x;
          EXIT WHEN creator_count = 0;
        END IF;
      END IF;
      INSERT INTO runs
      SELECT n.*
      -- The spec travels as text and is cast back once per creator (OFFSET 0): a multi-array
      -- unnest spreads a composite into its columns, and subscripting the array per position
      -- walks it from the start (quadratic over 10,000 items).
      FROM (SELECT w.*, w.spec_text::trigger_spec AS spec
            FROM unnest(item_idx, item_task, item_payload, item_key, item_key_ttl, item_hash, new_ids, item_creates,
                        item_spec::text[]) AS w(i, t, p, key, key_ttl, h, nid, creates, spec_text)
            WHERE w.creates
            OFFSET 0) AS w
      CROSS JOIN LATERAL new_run(w.nid, env, parent, b.id, w.i, w.t, w.p, w.spec,
                                 CASE WHEN (w.spec).delay_until > ts THEN 'DELAYED' ELSE 'PENDING' END, NULL,
                                 w.key, w.h, ts + w.key_ttl, ts) AS n
      ON CONFLICT DO NOTHING;
      GET DIAGNOSTICS inserted = ROW_COUNT;
      IF inserted = creator_count THEN
        -- Every creator's row went in: each open position takes its creator's new id (the
        -- creator is the first position of its group, so first_value finds it), and nothing is
        -- left to resolve. A creator owns its run; the rest of its group are cached items.
        SELECT array_agg(coalesce(x.run, x.nid) ORDER BY x.k), array_agg(x.run IS NULL ORDER BY x.k),
               array_agg(x.own OR (x.run IS NULL AND x.creator = x.k) ORDER BY x.k)
        INTO item_run, item_made, item_own
        FROM (SELECT w.k, w.run, w.own, w.creator,
                     first_value(w.nid) OVER (PARTITION BY w.creator, w.run IS NULL ORDER BY w.k) AS nid
              FROM unnest(item_run, item_creator, new_ids, item_own) WITH ORDINALITY AS w(run, creator, nid, own, k)) AS x;
        EXIT;
      END IF;
      -- A keyed creator lost a race with a concurrent trigger. Unkeyed creators got their rows
      -- (a fresh id conflicts with nothing); the next pass reads every open key's holder.
      SELECT array_agg(CASE WHEN w.run IS NULL AND w.h IS NULL AND w.creates THEN w.nid ELSE w.run END ORDER BY w.k),
             array_agg(w.own OR (w.run IS NULL AND w.h IS NULL AND w.creates) ORDER BY w.k)
      INTO item_run, item_own
      FROM unnest(item_hash, item_run, new_ids, item_creates, item_own) WITH ORDINALITY AS w(h, run, nid, creates, own, k);
    END LOOP;

    -- 5. Attach every new index to its run, and count it. A run created for its index is a
    --    member already (runs.batch_id/batch_index); every other index gets a batch_items row.
    --    Only a run that existed before this call can be final already or turn final
    --    concurrently: when every open position was filled by this call (item_made) there is
    --    none; otherwise a keyed position's run that does not carry this transaction's xmin is one.
    IF NOT (true = ALL (item_own)) THEN
      INSERT INTO batch_items (batch_id, item_index, run_id, created_at)
      SELECT b.id, u.i, u.r, ts FROM unnest(item_idx, item_run, item_own) AS u(i, r, own) WHERE NOT u.own;
      IF holders IS NOT NULL THEN
        PERFORM count_remote_items(b.id, ARRAY(SELECT u.r FROM unnest(item_run, item_own) AS u(r, own) WHERE NOT u.own));
      END IF;
    END IF;
    PERFORM count_attached(b.id, cardinality(item_idx),
                           ARRAY(SELECT w.run FROM unnest(item_hash, item_run, item_made) AS w(h, run, made)
                                 JOIN LATERAL (SELECT r.xmin FROM runs AS r
                                               WHERE w.h IS NOT NULL AND w.made IS NOT TRUE AND r.id = w.run) AS r
                                   ON true
                                 WHERE r.xmin <> pg_current_xact_id()::xid));
  END IF;
  IF NOT resent THEN
    RETURN friendly_ids(item_run, 'run');  -- the chunk is all new: in order already
  END IF;
  RETURN ARRAY(SELECT 'run_' || m.run_id FROM batch_members(b.id, first_index, first_index + all_item_count - 1) AS m);
END
$$;

-- Counts newly attached items. existing_runs holds, one per new index, the runs that existed
-- before (a cached run, a failed-task run): those already final count as finished at once. They
-- are share-locked first: a run turning final concurrently either finishes before (and is
-- counted here) or after this transaction (and counts itself through batch_item_finished, which
-- then sees the new rows). Runs created by the attaching call are live and unseen by others.
CREATE OR REPLACE FUNCTION runops.count_attached(batch_id text, attached integer, existing_runs text[])
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  finished integer := 0;
BEGIN
  IF cardinality(existing_runs) > 0 THEN
    PERFORM FROM runs AS r WHERE r.id = ANY (existing_runs) ORDER BY r.id FOR SHARE;
    SELECT count(*) INTO finished
    FROM unnest(existing_runs) AS u(id) JOIN runs AS r ON r.id = u.id
    WHERE is_final_status(r.status);
  END IF;
  UPDATE batches AS x
  SET item_count = x.item_count + attached, final_count = x.final_count + finished, updated_at = now()
  WHERE x.id = count_attached.batch_id;
  PERFORM finish_batch_if_done(count_attached.batch_id);
END
$$;

-- A sealed batch whose items have all finished completes, with its waitpoint.
CREATE OR REPLACE FUNCTION runops.finish_batch_if_done(batch_id text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  b batches;
  remote_ids text[];
  remote_final bigint;
  remote_statuses jsonb := '[]';
BEGIN
  SELECT * INTO b FROM batches AS x WHERE x.id = finish_batch_if_done.batch_id FOR UPDATE;
  IF NOT FOUND OR b.status <> 'PROCESSING' OR b.final_count + b.remote_items < b.expected_count THEN
    RETURN false;
  END IF;
  IF b.remote_items > 0 THEN
    -- Items whose run lives in the other store are counted by reading them (an id list, so
    -- postgres_fdw ships one = ANY); unreachable: not yet, tick asks again. Such a run was not
    -- created by this batch, so only batch_items can name it.
    remote_ids := ARRAY(SELECT i.run_id FROM batch_items AS i
                        WHERE i.batch_id = b.id AND try_classify_bare(i.run_id) <> local_residency());
    BEGIN
      SELECT coalesce(jsonb_agg(jsonb_build_object('id', r.id, 'status', r.status)), '[]'::jsonb)
      INTO remote_statuses
      FROM runops_peer.runs AS r WHERE r.id = ANY (remote_ids);
    EXCEPTION WHEN connection_exception THEN
      RETURN false;
    END;
    -- Per item: two items may name the same run.
    SELECT count(*) INTO remote_final
    FROM unnest(remote_ids) AS u(id)
    JOIN jsonb_to_recordset(remote_statuses) AS rr(id text, status text) ON rr.id = u.id
    WHERE is_final_status(rr.status);
    IF b.final_count + remote_final < b.expected_count THEN
      RETURN false;
    END IF;
  END IF;
  UPDATE batches AS x
  SET status = 'COMPLETED', completed_at = now(), updated_at = now(),
      output = (SELECT coalesce(jsonb_agg(jsonb_build_object('index', m.item_index, 'run_id', 'run_' || m.run_id,
                                                              'status', coalesce(r.status, rr.status))
                                          ORDER BY m.item_index), '[]'::jsonb)
                FROM batch_members(b.id, 0, b.expected_count - 1) AS m
                LEFT JOIN runs AS r ON r.id = m.run_id
                LEFT JOIN jsonb_to_recordset(remote_statuses) AS rr(id text, status text)
                  ON rr.id = m.run_id)
  WHERE x.id = b.id;
  PERFORM resume_local_waiters(b.id);
  RETURN true;
END
$$;

-- Items resolved to a run in the other store (a live key holder there): they count toward
-- completion when finish_batch_if_done reads them, never through final_count.
CREATE OR REPLACE FUNCTION runops.count_remote_items(batch_id text, run_ids text[])
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  n integer;
BEGIN
  SELECT count(*) INTO n FROM unnest(run_ids) AS u(id) WHERE try_classify_bare(u.id) <> local_residency();
  IF n > 0 THEN
    UPDATE batches AS x SET remote_items = x.remote_items + n WHERE x.id = count_remote_items.batch_id;
  END IF;
END
$$;

-- tick: sealed batches that wait on runs in the other store (their finishing is not seen here).
CREATE OR REPLACE FUNCTION runops.finish_remote_batches(max_rows integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  waiting text;
  n integer := 0;
BEGIN
  FOR waiting IN SELECT x.id FROM batches AS x WHERE x.status = 'PROCESSING' AND x.remote_items > 0
                 ORDER BY x.updated_at LIMIT max_rows LOOP
    IF finish_batch_if_done(waiting) THEN
      n := n + 1;
    END IF;
  END LOOP;
  RETURN n;
END
$$;

-- Called when a run turns final: every batch holding it (at one or more indexes) counts it —
-- the batch that created it (its own batch_id) and any holding it as a cached item.
CREATE OR REPLACE FUNCTION runops.batch_item_finished(run_id text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  held record;
BEGIN
  FOR held IN
    SELECT m.batch_id, count(*)::integer AS n
    FROM (SELECT r.batch_id FROM runs AS r WHERE r.id = batch_item_finished.run_id AND r.batch_id IS NOT NULL
          UNION ALL
          SELECT i.batch_id FROM batch_items AS i WHERE i.run_id = batch_item_finished.run_id) AS m
    GROUP BY m.batch_id ORDER BY m.batch_id
  LOOP
    UPDATE batches AS x SET final_count = x.final_count + held.n, updated_at = now()
    WHERE x.id = held.batch_id;
    PERFORM finish_batch_if_done(held.batch_id);
  END LOOP;
END
$$;

-- Creates the batch row (or finds the one holding its key), on the store that must own it.
-- Returns the batch and whether it was cached.
CREATE OR REPLACE FUNCTION runops.claim_batch(environment_id text, expected_count integer, options jsonb,
                                              sealed boolean, OUT batch runops.batches, OUT is_cached boolean,
                                              OUT env runops.environment_context)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  o record := parse_batch_options(options);
  spec trigger_spec;
  residency text;
  parent runs;
  new_id text;
  ts timestamptz := now();
BEGIN
  IF expected_count IS NULL OR expected_count NOT BETWEEN 1 AND 100000 THEN
    PERFORM raise_error('RO006', format('a batch holds 1 to 100000 items, got %s', quote_nullable(expected_count)));
  END IF;
  spec.parent_run_id := o.parent_run_id;
  spec.resume_parent_on_completion := o.resume_parent_on_completion;
  env := load_environment(claim_batch.environment_id);
  residency := decide_residency(env, claim_batch.environment_id, spec);
  IF residency <> local_residency() THEN
    PERFORM raise_wrong_store('a new batch of environment', claim_batch.environment_id, store_for_residency(residency));
  END IF;
  IF o.parent_run_id IS NOT NULL THEN
    parent := require_parent(spec, claim_batch.environment_id);
  END IF;
  env := require_usable(env, claim_batch.environment_id);
  PERFORM require_waitable_parent(parent, o.resume_parent_on_completion);
  LOOP
    IF o.idempotency_key IS NOT NULL THEN
      SELECT * INTO batch FROM batches AS x
      WHERE x.environment_id = env.id AND x.idempotency_key = o.idempotency_key;
      IF FOUND THEN
        IF NOT idempotency_key_expired(batch.idempotency_key_expires_at, ts) THEN
          is_cached := true;
          IF o.resume_parent_on_completion THEN
            PERFORM add_blocker(parent.id, parent.environment_id, batch.id, batch.status IN ('COMPLETED', 'ABORTED'));
            IF batch.status IN ('COMPLETED', 'ABORTED') THEN
              PERFORM resume_if_unblocked(parent.id, false);  -- a parent already suspended goes on at once
            END IF;
          END IF;
          RETURN;
        END IF;
        -- An expired key rotates: the old batch lets go of it (batch keys die only by expiry:
        -- docs/decisions.md).
        UPDATE batches AS x SET idempotency_key = NULL, idempotency_key_expires_at = NULL
        WHERE x.id = batch.id AND x.idempotency_key = o.idempotency_key;
      END IF;
    END IF;
    new_id := mint_id();
    INSERT INTO batches (id, environment_id, status, expected_count, parent_run_id, resume_parent_on_completion,
                         idempotency_key, idempotency_key_expires_at, seal_timeout, seal_deadline, sealed_at,
                         created_at, updated_at)
    VALUES (new_id, env.id, CASE WHEN sealed THEN 'PROCESSING' ELSE 'PENDING' END, expected_count, o.parent_run_id,
            o.resume_parent_on_completion, o.idempotency_key,
            CASE WHEN o.idempotency_key IS NOT NULL THEN ts + o.idempotency_key_ttl END, o.seal_timeout,
            CASE WHEN sealed THEN NULL ELSE ts + o.seal_timeout END, CASE WHEN sealed THEN ts END, ts, ts)
    ON CONFLICT DO NOTHING
    RETURNING * INTO batch;
    IF FOUND THEN
      is_cached := false;
      IF o.resume_parent_on_completion THEN
        PERFORM add_blocker(parent.id, parent.environment_id, batch.id, false);
      END IF;
      RETURN;
    END IF;
  END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION runops.batch_trigger(environment_id text, items jsonb, options jsonb DEFAULT '{}')
RETURNS TABLE (batch_id text, is_cached boolean, run_ids text[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  claimed record;
BEGIN
  PERFORM validate_batch_items(items, 0);
  claimed := claim_batch(batch_trigger.environment_id, jsonb_array_length(items), options, true);
  batch_id := 'batch_' || (claimed.batch).id;
  is_cached := claimed.is_cached;
  -- A cached batch is returned as it is; a new one gets all its items now.
  run_ids := CASE WHEN claimed.is_cached THEN (batch_row_of(claimed.batch)).run_ids
                  ELSE add_batch_items(claimed.batch, claimed.env, 0, items) END;
  RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_batch(environment_id text, expected_count integer,
                                               options jsonb DEFAULT '{}')
RETURNS TABLE (batch_id text, is_cached boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  claimed record := claim_batch(create_batch.environment_id, create_batch.expected_count, options, false);
BEGIN
  batch_id := 'batch_' || (claimed.batch).id;
  is_cached := claimed.is_cached;
  RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION runops.append_batch_items(batch_id text, start_index integer, items jsonb,
                                                    environment_id text DEFAULT NULL)
RETURNS SETOF runops.appended_items
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  b batches;
  env environment_context;
  n integer;
BEGIN
  IF start_index IS NULL OR start_index NOT BETWEEN 0 AND 99999 THEN  -- a batch holds at most 100000 items
    PERFORM raise_error('RO006', format('start_index must be from 0 to 99999, got %s', quote_nullable(start_index)));
  END IF;
  PERFORM validate_batch_items(items, start_index);
  n := jsonb_array_length(items);
  b := lock_batch(append_batch_items.batch_id);  -- appenders of one batch take turns
  PERFORM require_row_environment(b.environment_id, append_batch_items.environment_id, 'batch',
                                  append_batch_items.batch_id);
  IF start_index > b.expected_count - n THEN  -- (start_index + n could overflow an integer)
    PERFORM raise_error('RO006', format('items %s to %s are past the batch''s expected_count of %s',
                                        start_index, start_index + n - 1, b.expected_count));
  END IF;
  -- The RO005 gate of every entry point that admits runs, before the RO003 checks.
  env := require_usable(load_environment(b.environment_id), b.environment_id);
  IF b.status = 'ABORTED' THEN
    PERFORM raise_error('RO003', format('batch_%s was aborted (its seal timeout passed)', b.id));
  END IF;
  IF b.status <> 'PENDING'
     AND (SELECT count(*) FROM batch_members(b.id, start_index, start_index + n - 1)) < n THEN  -- a new index
    PERFORM raise_error('RO003', format('batch_%s is sealed: it takes no new items', b.id));
  END IF;
  RETURN NEXT ROW('batch_' || b.id, start_index, add_batch_items(b, env, start_index, items))::appended_items;
END
$$;

CREATE OR REPLACE FUNCTION runops.seal_batch(batch_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.sealed_batch
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  b batches := lock_batch(seal_batch.batch_id);
BEGIN
  PERFORM require_row_environment(b.environment_id, seal_batch.environment_id, 'batch', seal_batch.batch_id);
  IF b.status = 'ABORTED' THEN
    PERFORM raise_error('RO003', format('batch_%s was aborted (its seal timeout passed); it cannot be sealed', b.id));
  END IF;
  IF b.status = 'PENDING' THEN
    IF b.item_count < b.expected_count THEN
      PERFORM raise_error('RO006', format('batch_%s has %s of its %s items; append the rest before sealing',
                                          b.id, b.item_count, b.expected_count));
    END IF;
    UPDATE batches AS x SET status = 'PROCESSING', sealed_at = now(), seal_deadline = NULL, updated_at = now()
    WHERE x.id = b.id;
    PERFORM finish_batch_if_done(b.id);
  END IF;
  RETURN QUERY SELECT 'batch_' || x.id, x.status, x.item_count, x.expected_count FROM batches AS x WHERE x.id = b.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.resume_batch_run(batch_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.batch_row
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  b batches := lock_batch(resume_batch_run.batch_id);
BEGIN
  PERFORM require_row_environment(b.environment_id, resume_batch_run.environment_id, 'batch',
                                  resume_batch_run.batch_id);
  -- Recount from the runs themselves (the incremental count is the fast path; this is the
  -- authority), then complete if every item has finished. Idempotent.
  UPDATE batches AS x
  SET final_count = (SELECT count(*) FROM batch_members(b.id, 0, b.expected_count - 1) AS m
                     JOIN runs AS r ON r.id = m.run_id
                     WHERE is_final_status(r.status))
  WHERE x.id = b.id;
  PERFORM finish_batch_if_done(b.id);
  RETURN QUERY SELECT r.* FROM batches AS x, LATERAL batch_row_of(x) AS r WHERE x.id = b.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.get_batch(batch_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.batch_row
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text := bare_id(get_batch.batch_id, 'batch');
  residency text := try_classify_bare(bare);
  env_id text := get_batch.environment_id;
BEGIN
  IF residency IS NULL THEN
    RETURN;
  END IF;
  IF residency = local_residency() THEN
    RETURN QUERY SELECT r.* FROM batches AS x, LATERAL batch_row_of(x) AS r
                 WHERE x.id = bare AND (env_id IS NULL OR x.environment_id = env_id);
    RETURN;
  END IF;
  IF NOT peer_wired() OR (residency = 'NEW' AND NOT (current_split_settings()).ever_enabled) THEN
    RETURN;
  END IF;
  BEGIN
    RETURN QUERY
    SELECT 'batch_' || x.id, x.environment_id, x.status, x.expected_count, x.item_count,
           -- The other store's batch_members(), through the FDW: two plain predicates.
           ARRAY(SELECT 'run_' || m.run_id
                 FROM (SELECT r.batch_index AS item_index, r.id AS run_id FROM runops_peer.runs AS r
                       WHERE r.batch_id = bare
                       UNION ALL
                       SELECT i.item_index, i.run_id FROM runops_peer.batch_items AS i WHERE i.batch_id = bare) AS m
                 ORDER BY m.item_index),
           x.status <> 'PENDING', x.created_at, x.completed_at, x.idempotency_key
    FROM runops_peer.batches AS x
    WHERE x.id = bare AND (env_id IS NULL OR x.environment_id = env_id);
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', format('the %s store that owns %s is unavailable: %s',
                                        store_for_residency(residency), get_batch.batch_id, SQLERRM));
  END;
END
$$;

-- Open batches past their seal timeout are ABORTED; their waitpoint completes with an error,
-- so a waiting parent resumes instead of hanging.
CREATE OR REPLACE FUNCTION runops.abort_unsealed_batches(max_rows integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  stale record;
  n integer := 0;
BEGIN
  FOR stale IN
    SELECT x.id, x.item_count, x.expected_count, x.seal_timeout FROM batches AS x
    WHERE x.status = 'PENDING' AND x.seal_deadline <= ts
    ORDER BY x.seal_deadline LIMIT max_rows FOR UPDATE SKIP LOCKED
  LOOP
    UPDATE batches AS x
    SET status = 'ABORTED', completed_at = ts, seal_deadline = NULL, updated_at = ts,
        output = jsonb_build_object('message', format('batch was not sealed within its seal timeout (%s): %s of %s items arrived',
                                                      duration_text(stale.seal_timeout), stale.item_count,
                                                      stale.expected_count))
    WHERE x.id = stale.id;
    PERFORM resume_local_waiters(stale.id);
    n := n + 1;
  END LOOP;
  RETURN n;
END
$$;

-- A single trigger naming batch_id and batch_index (a streaming client's own item, or a
-- trigger_failed_task standing in for an item that could not be triggered) joins the batch at
-- that index. First, before the environment's usability: the batch, locked (RO004 for another
-- environment's, RO006 for an index past the end).
CREATE OR REPLACE FUNCTION runops.lock_batch_for_index(spec runops.trigger_spec, environment_id text)
RETURNS runops.batches
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  b batches := lock_bare_batch(spec.batch_id);
BEGIN
  IF b.environment_id <> lock_batch_for_index.environment_id THEN
    PERFORM raise_error('RO004', format('batch batch_%s not found in environment %s', b.id,
                                        lock_batch_for_index.environment_id));
  END IF;
  IF spec.batch_index >= b.expected_count THEN
    PERFORM raise_error('RO006', format('batch_index %s is past the batch''s expected_count of %s',
                                        spec.batch_index, b.expected_count));
  END IF;
  RETURN b;
END
$$;

-- Then, last: the run already at that index (a re-sent index keeps its first content), or NULL
-- when the index is free — RO003 when the batch takes no new items.
CREATE OR REPLACE FUNCTION runops.claim_batch_index(b runops.batches, spec runops.trigger_spec)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  existing text;
BEGIN
  SELECT m.run_id INTO existing FROM batch_members(b.id, spec.batch_index, spec.batch_index) AS m;
  IF existing IS NULL AND b.status <> 'PENDING' THEN
    PERFORM raise_error('RO003', format('batch_%s is %s: it takes no new items', b.id, b.status));
  END IF;
  RETURN existing;
END
$$;

-- The run admit_new_run got for a free index: created for it (find_or_create_run wrote batch_id and
-- batch_index into its row: a member already) or cached (a key's holder, maybe in the other
-- store: a batch_items row).
CREATE OR REPLACE FUNCTION runops.attach_batch_item(batch_id text, batch_index integer, run_id text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  IF NOT EXISTS (SELECT FROM runs AS r WHERE r.id = attach_batch_item.run_id
                   AND r.batch_id = attach_batch_item.batch_id AND r.batch_index = attach_batch_item.batch_index) THEN
    INSERT INTO batch_items (batch_id, item_index, run_id, created_at)
    VALUES (attach_batch_item.batch_id, attach_batch_item.batch_index, attach_batch_item.run_id, now());
    PERFORM count_remote_items(attach_batch_item.batch_id, ARRAY[attach_batch_item.run_id]);
  END IF;
  -- The run may be final already (trigger_failed_task's, or a finished key holder).
  PERFORM count_attached(attach_batch_item.batch_id, 1, ARRAY[attach_batch_item.run_id]);
END
$$;

-- sql/functions/bounded_input.sql
-- Admission checks: what every entry point that admits runs validates before it looks anything up
-- (SPEC §3 [1.2], bounded input), each failure RO006.
--
--   max_index_text_bytes  every indexed text (keys, tags, queues, task ids) is at most 2048 bytes
--                         in UTF-8 as well as its character limit: a btree entry must stay under
--                         ~2.7 kB, and 2048 four-byte characters would not (54000).
--   check_json_bounds     payload, metadata, output and error: at most store_config.max_json_bytes
--                         serialized (default 3 MiB) and max_json_depth levels of nesting
--                         (default 64; psycopg's json loader recurses, 1500 levels kill it).
--   require_between       a whole-number argument within its bounds (max_rows, max_runs, attempt numbers)
--   task_identifier_is_valid   1-128 of [A-Za-z0-9_.:/-]
--   validate_new_run      trigger_run and trigger_failed_task: every RO006 of one run
--   validate_batch_items  the same rules, set-based, for a chunk of batch items
-- The limits are read from store_config only for values that could exceed the smallest limit a
-- store may configure (64 KiB, 32 levels): the common small payload costs one conversion to
-- text and a jsonpath walk of its first 32 levels.

CREATE OR REPLACE FUNCTION runops.max_index_text_bytes()
RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$
  SELECT 2048
$$;

-- A whole-number argument within its bounds: NULL is as wrong as out of range. Returns it.
CREATE OR REPLACE FUNCTION runops.require_between(value integer, low integer, high integer, what text)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF value IS NULL OR value NOT BETWEEN low AND high THEN
    PERFORM raise_invalid(what, format('from %s to %s', low, high), quote_nullable(value));
  END IF;
  RETURN value;
END
$$;

-- The path that finds a container at nesting level `depth` (the root is level 0): it exists
-- exactly when the value nests deeper than `depth` levels. prefix selects where to look from.
CREATE OR REPLACE FUNCTION runops.json_too_deep_path(depth integer, prefix text DEFAULT '$')
RETURNS jsonpath
LANGUAGE sql IMMUTABLE
AS $$
  SELECT ('strict ' || prefix || '.**{' || depth || '} ? (@.type() == "array" || @.type() == "object")')::jsonpath
$$;

-- The check itself, against this store's limits, for a value already known to be large or
-- bracket-heavy. bytes is its serialized size.
CREATE OR REPLACE FUNCTION runops.check_json_limits(value jsonb, bytes integer, what text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  limits record;
BEGIN
  SELECT c.max_json_bytes, c.max_json_depth INTO limits FROM store_config AS c;
  IF bytes > limits.max_json_bytes THEN
    PERFORM raise_error('RO006', format('%s is %s bytes serialized; the limit is %s bytes', what, bytes,
                                        limits.max_json_bytes),
                        NULL, 'store large data elsewhere and pass a reference');
  END IF;
  IF jsonb_path_exists(value, json_too_deep_path(limits.max_json_depth)) THEN
    PERFORM raise_error('RO006', format('%s nests deeper than %s levels', what, limits.max_json_depth));
  END IF;
END
$$;

-- Whether a JSON value is within the smallest limits any store may configure (64 KiB
-- serialized, 32 levels): then no store's limit is crossed and store_config need not be read.
-- Inlined SQL, so trigger_run's fast path holds it as a predicate.
CREATE OR REPLACE FUNCTION runops.payload_within_smallest_limits(value jsonb)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT octet_length(value::text) <= 65536
         AND NOT jsonb_path_exists(value, 'strict $.**{32} ? (@.type() == "array" || @.type() == "object")')
$$;

CREATE OR REPLACE FUNCTION runops.check_json_bounds(value jsonb, what text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF value IS NULL THEN
    RETURN;
  END IF;
  -- The conversion is the cost (about as much as writing the value); no bound on the stored
  -- jsonb size can replace it: a 10-byte numeric 1e100000 prints as 100001 digits.
  IF payload_within_smallest_limits(value) THEN
    RETURN;
  END IF;
  PERFORM check_json_limits(value, octet_length(value::text), what);
END
$$;

CREATE OR REPLACE FUNCTION runops.task_identifier_is_valid(task_identifier text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  -- An unbounded pattern and a length check: a bounded {0,127} costs ~5 us per match. ASCII
  -- only, so 128 characters are 128 bytes.
  SELECT length(task_identifier) <= 128 AND task_identifier ~ '^[A-Za-z0-9][A-Za-z0-9_.:/-]*$'
$$;

-- The one validation of a run about to be admitted (trigger_run, trigger_failed_task; batch
-- items take the same checks set-based in validate_batch_items): every RO006 before anything is
-- looked up. Returns the parsed options.
CREATE OR REPLACE FUNCTION runops.validate_new_run(environment_id text, task_identifier text, payload jsonb,
                                                   options jsonb)
RETURNS runops.trigger_spec
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  spec trigger_spec;
BEGIN
  IF environment_id IS NULL OR environment_id = '' THEN
    PERFORM raise_error('RO006', 'environment_id is required');
  END IF;
  IF task_identifier IS NULL OR NOT task_identifier_is_valid(task_identifier) THEN
    PERFORM raise_error('RO006', format('task_identifier must be 1-128 letters, digits or _.:/-, got %s',
                                         quote_nullable(input_prefix(task_identifier))));
  END IF;
  spec := parse_trigger_options(options);
  PERFORM check_json_bounds(payload, 'payload');
  RETURN spec;
END
$$;

-- Creates or finds the runs of a validated chunk (validate_batch_items) set-based and attaches them at first_index onwards. Indexes the
-- batch already holds keep their first content. Returns the item run ids (friendly), in order.
-- Validates a chunk of batch items before anything is locked or written: RO006 naming the
-- first bad index (its shape set-based; options richer than a lone idempotency_key through
-- parse_trigger_options, the single-trigger parser, item by item).
CREATE OR REPLACE FUNCTION runops.validate_batch_items(items jsonb, first_index integer)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  bad record;
  spec trigger_spec;
  limits record;
  deep boolean;
BEGIN
  IF items IS NULL OR jsonb_typeof(items) <> 'array' OR jsonb_array_length(items) = 0 THEN
    PERFORM raise_error('RO006', 'items must be a non-empty JSON array of {task, payload, options}');
  END IF;
  IF jsonb_array_length(items) > 100000 THEN
    PERFORM raise_error('RO006', format('a call takes at most 100000 items, got %s', jsonb_array_length(items)));
  END IF;
  -- 1. Shape of every item, set-based: the first bad index is reported.
  SELECT e.n - 1 + first_index AS idx,
         CASE WHEN jsonb_typeof(e.item) <> 'object' THEN 'must be an object {task, payload, options}'
              WHEN (e.item - ARRAY['task', 'payload', 'options']) <> '{}'::jsonb
                THEN 'has fields other than task, payload and options'
              WHEN jsonb_typeof(e.item -> 'task') IS DISTINCT FROM 'string'
                   OR NOT task_identifier_is_valid(e.item ->> 'task')
                THEN 'needs a task of 1-128 letters, digits or _.:/-'
              WHEN e.item ? 'options' AND jsonb_typeof(e.item -> 'options') NOT IN ('object', 'null')
                THEN 'options must be an object'
         END AS problem
  INTO bad
  FROM jsonb_array_elements(items) WITH ORDINALITY AS e(item, n)
  WHERE jsonb_typeof(e.item) <> 'object'
     OR (e.item - ARRAY['task', 'payload', 'options']) <> '{}'::jsonb
     OR jsonb_typeof(e.item -> 'task') IS DISTINCT FROM 'string'
     OR NOT task_identifier_is_valid(e.item ->> 'task')
     OR (e.item ? 'options' AND jsonb_typeof(e.item -> 'options') NOT IN ('object', 'null'))
  ORDER BY e.n LIMIT 1;
  IF FOUND THEN
    PERFORM raise_error('RO006', format('batch item %s %s; nothing was created', bad.idx, bad.problem));
  END IF;

  FOR bad IN
    SELECT e.n - 1 + first_index AS idx, e.item -> 'options' AS opts
    FROM jsonb_array_elements(items) WITH ORDINALITY AS e(item, n)
    WHERE coalesce(nullif(e.item -> 'options', 'null'::jsonb), '{}'::jsonb) - 'idempotency_key' <> '{}'::jsonb
       OR (e.item -> 'options' ? 'idempotency_key'
           AND (jsonb_typeof(e.item -> 'options' -> 'idempotency_key') <> 'string'
                OR length(e.item -> 'options' ->> 'idempotency_key') NOT BETWEEN 1 AND 2048
                OR octet_length(e.item -> 'options' ->> 'idempotency_key') > max_index_text_bytes()))
    ORDER BY e.n
  LOOP
    IF bad.opts ?| ARRAY['parent_run_id', 'resume_parent_on_completion', 'batch_id', 'batch_index', 'run_id'] THEN
      PERFORM raise_error('RO006', format('batch item %s: parent_run_id, resume_parent_on_completion, batch_id, '
                                          'batch_index and run_id belong to the batch, not its items; nothing was created', bad.idx));
    END IF;
    BEGIN
      spec := parse_trigger_options(bad.opts);
    EXCEPTION WHEN SQLSTATE 'RO006' THEN
      PERFORM raise_error('RO006', format('batch item %s: %s; nothing was created', bad.idx, SQLERRM));
    END;
  END LOOP;

  -- 3. Payloads within the store's JSON limits (check_json_bounds, set-based): one conversion to
  --    text per item for the size, one path over the whole call for the depth.
  SELECT c.max_json_bytes, c.max_json_depth INTO limits FROM store_config AS c;
  deep := jsonb_path_exists(items, json_too_deep_path(limits.max_json_depth, '$[*] ? (exists(@.payload)).payload'));
  SELECT e.n - 1 + first_index AS idx, e.item -> 'payload' AS payload,
         octet_length((e.item -> 'payload')::text) AS bytes
  INTO bad
  FROM jsonb_array_elements(items) WITH ORDINALITY AS e(item, n)
  WHERE octet_length((e.item -> 'payload')::text) > limits.max_json_bytes
     OR (deep AND jsonb_path_exists(e.item -> 'payload', json_too_deep_path(limits.max_json_depth)))
  ORDER BY e.n LIMIT 1;
  IF FOUND THEN
    PERFORM check_json_limits(bad.payload, bad.bytes, format('batch item %s payload', bad.idx));
  END IF;

END
$$;

-- sql/functions/claims.sql
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
    -- postgres_fdw reads every foreign table of this transaction in one REPEATABLE READ
    -- snapshot, so the snapshot the view reports is the one the holder is read in.
    BEGIN
      finished := claimant_xid IS NULL;
      IF NOT finished THEN
        SELECT pg_visible_in_snapshot(claimant_xid::text::xid8, v.snapshot::pg_snapshot) INTO finished
        FROM runops_peer.xact_snapshot_view AS v;
      END IF;
      SELECT r.status, r.idempotency_key_hash, r.idempotency_key_expires_at, r.environment_id, r.task_identifier
      INTO holder_status, h_hash, h_expires_at, h_environment, h_task
      FROM runops_peer.runs AS r WHERE r.id = judge_claim.run_id;
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
  c record;
  judged record;
  passes integer := 0;
BEGIN
  IF NOT local_ledger THEN
    my_xid := pg_current_xact_id()::text::bigint;
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
    ELSE
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
    ELSE
      BEGIN
        UPDATE runops_peer.idempotency_claims AS l
        SET run_id = claim_idempotency_key.run_id, claimant_xid = my_xid, expires_at = claim_idempotency_key.expires_at,
            claimed_at = ts
        WHERE l.environment_id = claim_idempotency_key.environment_id
          AND l.task_identifier = claim_idempotency_key.task_identifier AND l.key_hash = claim_idempotency_key.key_hash
          AND l.run_id = c.run_id;
      EXCEPTION WHEN connection_exception THEN
        PERFORM raise_error('RO009', 'the run-ops store, which keeps the idempotency claim ledger, is unavailable: '
                                     || SQLERRM);
      END;
    END IF;
    IF FOUND THEN
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
BEGIN
  IF (current_split_settings()).claims_backfilled_at IS NOT NULL THEN
    RETURN;
  END IF;
  BEGIN
    SELECT r.id, r.status, r.idempotency_key_expires_at AS expires_at INTO h
    FROM runops_peer.runs AS r
    WHERE r.environment_id = adopt_unclaimed_holder.environment_id
      AND r.task_identifier = adopt_unclaimed_holder.task_identifier
      AND r.idempotency_key_hash = adopt_unclaimed_holder.key_hash;
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
  ELSE
    UPDATE runops_peer.idempotency_claims AS l SET run_id = h.id, claimant_xid = NULL, expires_at = h.expires_at
    WHERE l.environment_id = adopt_unclaimed_holder.environment_id
      AND l.task_identifier = adopt_unclaimed_holder.task_identifier
      AND l.key_hash = adopt_unclaimed_holder.key_hash AND l.run_id = adopt_unclaimed_holder.run_id;
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
-- transaction: a reader that sees it finished also sees every run it names.
CREATE OR REPLACE FUNCTION runops.backfill_claims()
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  n bigint;
BEGIN
  INSERT INTO runops_peer.idempotency_claims (environment_id, task_identifier, key_hash, run_id, claimant_xid,
                                              expires_at, claimed_at)
  SELECT r.environment_id, r.task_identifier, r.idempotency_key_hash, r.id, pg_current_xact_id()::text::bigint,
         r.idempotency_key_expires_at, ts
  FROM runs AS r
  WHERE r.idempotency_key_hash IS NOT NULL
    AND NOT idempotency_key_is_dead(r.status, r.idempotency_key_expires_at, ts)
  ON CONFLICT DO NOTHING;
  GET DIAGNOSTICS n = ROW_COUNT;
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

-- sql/functions/clock.sql
-- The clock: every time comparison reads runops.now(), which tests freeze with the session setting
-- runops.fake_now (SPEC §3).

-- The one clock. runops.fake_now freezes it for tests, but only for members of runops_clock:
-- anyone else setting it is ignored rather than obeyed.
CREATE OR REPLACE FUNCTION runops.now()
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  fake text := pg_catalog.current_setting('runops.fake_now', true);
BEGIN
  IF fake IS NULL OR fake = '' THEN
    RETURN pg_catalog.now();
  END IF;
  IF NOT pg_catalog.pg_has_role(session_user, 'runops_clock', 'MEMBER') THEN
    RETURN pg_catalog.now();
  END IF;
  RETURN fake::timestamptz;
END
$$;

-- sql/functions/defaults.sql
-- Defaults, once (SPEC §4): every entry point that leaves one of these out gets the value here.
-- Plain IMMUTABLE SQL, so PostgreSQL folds each into the plans that use it: a constant, not a call.
--
--   default_idempotency_key_ttl  how long a key lives: runs, batches, batch items, waitpoints (30 days)
--   default_max_attempts         attempts a run gets (3; runs.max_attempts carries the same DEFAULT)
--   default_seal_timeout         how long an open batch waits to be sealed (10 minutes)
--   default_lease                how long a dequeued run stays a worker's between heartbeats (5 minutes)

CREATE OR REPLACE FUNCTION runops.default_idempotency_key_ttl()
RETURNS interval
LANGUAGE sql IMMUTABLE
AS $$
  SELECT interval '30 days'
$$;

CREATE OR REPLACE FUNCTION runops.default_max_attempts()
RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$
  SELECT 3
$$;

CREATE OR REPLACE FUNCTION runops.default_seal_timeout()
RETURNS interval
LANGUAGE sql IMMUTABLE
AS $$
  SELECT interval '10 minutes'
$$;

CREATE OR REPLACE FUNCTION runops.default_lease()
RETURNS interval
LANGUAGE sql IMMUTABLE
AS $$
  SELECT interval '5 minutes'
$$;

-- sql/functions/errors.sql
-- Raising errors: every failure is an RO SQLSTATE with a message that says what was wrong, with
-- which value, and what is accepted (SPEC §3).
--
--   input_prefix             the short prefix of an input a message may quote
--   raise_error              the one RAISE (cuts message, detail and hint at 512 characters)
--   raise_invalid            RO006 "<what> must be <expected>, got <got>": the one wording of bad input
--   raise_wrong_store        RO002 naming the owning store in DETAIL
--   refuse_foreign_id        a write naming the other store's row: RO002 (or RO004 before any split)
--   require_row_environment  the environment guard (SPEC §3 [1.2]): another environment's row is RO004
--
-- Internal helpers (here and in the other files) carry no SET search_path: only the owner may
-- execute them, always from a public function whose search_path is pinned, and a SET clause
-- would stop PostgreSQL inlining the SQL ones and cost a GUC save/restore per call.

-- At most a short prefix of any input a message quotes: a 1 MB id must not reach the log whole.
CREATE OR REPLACE FUNCTION runops.input_prefix(value text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT CASE WHEN length(value) > 100 THEN left(value, 100) || '...' ELSE value END
$$;

CREATE OR REPLACE FUNCTION runops.raise_error(code text, message text, detail text DEFAULT NULL,
                                              hint text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  -- The backstop for a call site that quotes an input whole: no message outgrows 512 characters.
  IF length(message) > 512 THEN
    message := left(message, 512) || '...';
  END IF;
  IF length(detail) > 512 THEN
    detail := left(detail, 512) || '...';
  END IF;
  IF length(hint) > 512 THEN
    hint := left(hint, 512) || '...';
  END IF;
  -- RAISE needs literal option lists, so the NULL combinations are spelled out.
  IF detail IS NULL AND hint IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message;
  ELSIF hint IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, DETAIL = detail;
  ELSIF detail IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, HINT = hint;
  ELSE
    RAISE EXCEPTION USING ERRCODE = code, MESSAGE = message, DETAIL = detail, HINT = hint;
  END IF;
END
$$;

-- An input of the wrong form, in one wording: "<what> must be <expected>", then ", got <got>" when
-- what came helps the caller (got is already cut: input_prefix, a JSON type, quote_nullable).
CREATE OR REPLACE FUNCTION runops.raise_invalid(what text, expected text, got text DEFAULT NULL,
                                                hint text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM raise_error('RO006', format('%s must be %s', what, expected) || coalesce(', got ' || got, ''), NULL, hint);
END
$$;

-- RO002 always names the store that owns the row, so a caller can retry there.
CREATE OR REPLACE FUNCTION runops.raise_wrong_store(what text, id text, owning_store text)
RETURNS void
LANGUAGE plpgsql
AS $$
BEGIN
  PERFORM raise_error('RO002',
    format('%s %s belongs to the %s store, not this %s store', what, id, owning_store, store_role()),
    'owning_store=' || owning_store,
    'call this function on the store named in DETAIL (the Python client does this for you)');
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
    PERFORM raise_error('RO004', format('%s %s not found (the split was never enabled)', what, id));
  END IF;
  PERFORM raise_wrong_store(what, id, store_for_residency(residency));
END
$$;

-- Environment guard (SPEC §3 [1.2]): a write naming a row by id may say which environment the
-- caller acts for; a row of another environment is then "not found" (RO004), and nothing changes.
CREATE OR REPLACE FUNCTION runops.require_row_environment(row_environment_id text, environment_id text, what text,
                                                          id text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF environment_id IS NOT NULL AND row_environment_id IS DISTINCT FROM environment_id THEN
    PERFORM raise_error('RO004', format('%s %s not found in environment %s', what, input_prefix(id),
                                        quote_literal(input_prefix(environment_id))));
  END IF;
END
$$;

-- sql/functions/idempotency.sql
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
    PERFORM raise_error('RO006', format('scope must be run, attempt or global, got %s', scope));
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

-- sql/functions/lifecycle.sql
-- Lifecycle: the state machine and the worker's path through it.
--
-- Every status change is checked by one trigger (guard_run_status) against
-- runops.status_transitions, which also sends the change to listeners. Functions name the move
-- they make in the transaction-local setting runops.transition_by; a direct UPDATE without it
-- may make any move the table allows, and none it does not.
--
--   dequeue_runs      PENDING -> DEQUEUED            (lease, FOR UPDATE SKIP LOCKED)
--   start_attempt     DEQUEUED -> EXECUTING           (or CRASHED past max_attempts)
--   complete_attempt  EXECUTING -> COMPLETED_SUCCESSFULLY
--   fail_attempt      EXECUTING -> RETRYING_AFTER_FAILURE | a final failure
--   create_checkpoint EXECUTING -> WAITING_TO_RESUME
--   resume_run        WAITING_TO_RESUME -> PENDING   (once nothing blocks it)
--   finalize_run      any live -> any final
--   cancel_run        any live -> CANCELED, down the tree of live children
--   cancel_dev_session_runs            the same for a dev session's live runs
--   execute_tasks_waiting_for_deploy   WAITING_FOR_DEPLOY / PENDING_VERSION -> PENDING
-- Every write naming a run takes an optional trailing environment_id (the environment guard,
-- SPEC §3 [1.2]): lock_run answers RO004 for another environment's run. Outputs, errors and
-- metadata pass check_json_bounds (RO006) before anything is locked.
-- A run that turns final completes the edges waiting on it (its RUN waitpoint) and closes its
-- open attempt, in the same transaction (after_run_final).

-- Which statuses are final: runops.is_final_status, with the vocabulary (sql/schema/20_run_graph.sql).

-- Names the move the next status change makes; returns the previous mover so nested moves
-- (a completion resuming a parent) can restore it.
CREATE OR REPLACE FUNCTION runops.set_mover(mover text)
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  previous text := coalesce(current_setting('runops.transition_by', true), '');
BEGIN
  PERFORM set_config('runops.transition_by', coalesce(mover, ''), true);
  RETURN previous;
END
$$;

CREATE OR REPLACE FUNCTION runops.guard_run_status()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  mover text := nullif(current_setting('runops.transition_by', true), '');
BEGIN
  IF NOT EXISTS (SELECT FROM status_transitions AS t
                 WHERE t.from_status = OLD.status AND t.to_status = NEW.status
                   AND (mover IS NULL OR t.made_by = mover)) THEN
    PERFORM raise_error('RO003',
      format('run run_%s cannot move from %s to %s%s', OLD.id, OLD.status, NEW.status,
             CASE WHEN mover IS NULL THEN '' ELSE ' by ' || mover END),
      NULL, CASE WHEN is_final_status(OLD.status) THEN 'a final run never changes again' END);
  END IF;
  -- Committed with the change, so a listener never hears of a status that was rolled back.
  IF (SELECT e.notifications FROM runtime_environments AS e WHERE e.id = NEW.environment_id) IS DISTINCT FROM false THEN
    PERFORM pg_notify('runops_env_' || NEW.environment_id,
                      json_build_object('run_id', 'run_' || NEW.id, 'old_status', OLD.status,
                                        'new_status', NEW.status, 'at', NEW.updated_at)::text);
  END IF;
  RETURN NEW;
END
$$;

-- A run turned final: close its open attempt, and complete every local edge waiting on it
-- (its RUN waitpoint), resuming runs that were waiting only on it.
CREATE OR REPLACE FUNCTION runops.after_run_final()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  UPDATE attempts AS a
  SET status = CASE NEW.status WHEN 'COMPLETED_SUCCESSFULLY' THEN 'COMPLETED'
                               WHEN 'CANCELED' THEN 'CANCELED' ELSE 'FAILED' END,
      output = coalesce(a.output, NEW.output),
      error = coalesce(a.error, NEW.error),
      completed_at = coalesce(a.completed_at, now())
  WHERE a.run_id = NEW.id AND a.status IN ('EXECUTING', 'PAUSED');
  PERFORM resume_local_waiters(NEW.id);
  PERFORM batch_item_finished(NEW.id);
  RETURN NULL;
END
$$;

-- The two triggers behind the state machine: every status change passes the guard; a run turned
-- final completes what waits on it (its RUN waitpoint) in the same transaction.
CREATE OR REPLACE TRIGGER runs_status_guard
  BEFORE UPDATE OF status ON runops.runs
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
  EXECUTE FUNCTION runops.guard_run_status();

CREATE OR REPLACE TRIGGER runs_after_final
  AFTER UPDATE OF status ON runops.runs
  FOR EACH ROW
  WHEN (runops.is_final_status(NEW.status) AND NOT runops.is_final_status(OLD.status))
  EXECUTE FUNCTION runops.after_run_final();

-- The one row-level entry to a per-run write: RO006/RO001 for a bad id, RO002 for another
-- store's run, RO004 when it is missing or (environment_id given) of another environment.
-- Locks the run.
CREATE OR REPLACE FUNCTION runops.lock_run(run_id text, environment_id text)
RETURNS runops.runs
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  bare text := require_local_id(run_id, 'run', 'run_id');
  r runs;
BEGIN
  SELECT * INTO r FROM runs AS x WHERE x.id = bare FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('run %s not found', run_id));
  END IF;
  PERFORM require_row_environment(r.environment_id, lock_run.environment_id, 'run', run_id);
  RETURN r;
END
$$;

CREATE OR REPLACE FUNCTION runops.require_worker(worker_id text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF worker_id IS NULL OR worker_id = '' OR length(worker_id) > 256 OR octet_length(worker_id) > 1024 THEN
    PERFORM raise_error('RO006', 'worker_id must be 1 to 256 characters (at most 1024 bytes)');
  END IF;
  RETURN worker_id;
END
$$;

-- The opening of a worker's call on its leased run: RO006 for a bad worker id, lock_run's
-- refusals, then RO003 unless the run is in a status the call accepts — DEQUEUED to start an
-- attempt (a final run gets no more), DEQUEUED or EXECUTING otherwise — and leased to this
-- worker. Returns the run, locked.
CREATE OR REPLACE FUNCTION runops.lock_leased_run(run_id text, worker_id text, environment_id text, what text,
                                                  starting boolean)
RETURNS runops.runs
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  worker text := require_worker(worker_id);
  r runs := lock_run(run_id, environment_id);
BEGIN
  IF starting THEN
    IF is_final_status(r.status) THEN
      PERFORM raise_error('RO003', format('run_%s is %s: a final run gets no more attempts', r.id, r.status));
    END IF;
    IF r.status <> 'DEQUEUED' THEN
      PERFORM raise_error('RO003', format('%s needs a dequeued run; run_%s is %s', what, r.id, r.status),
                          NULL, 'dequeue it with dequeue_runs first');
    END IF;
  ELSIF r.status NOT IN ('DEQUEUED', 'EXECUTING') THEN
    PERFORM raise_error('RO003', format('%s needs a dequeued or executing run; run_%s is %s', what, r.id, r.status));
  END IF;
  IF r.locked_by IS DISTINCT FROM worker THEN
    PERFORM raise_error('RO003', format('run_%s is leased to worker %s, not %s', r.id,
                                        coalesce(r.locked_by, '(none)'), worker),
                        NULL, 'dequeue the run again; its lease may have lapsed');
  END IF;
  RETURN r;
END
$$;

-- The attempt a worker reports on: RO003 for a stale attempt or a run no longer executing.
CREATE OR REPLACE FUNCTION runops.require_current_attempt(r runops.runs, attempt_number integer, what text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF r.status <> 'EXECUTING' THEN
    PERFORM raise_error('RO003', format('%s needs an executing run; run_%s is %s', what, r.id, r.status),
                        NULL, CASE WHEN r.status = 'CANCELED' THEN 'the run was canceled: stop working on it' END);
  END IF;
  IF r.attempt_number <> attempt_number THEN
    PERFORM raise_error('RO003', format('attempt %s of run_%s is stale: the current attempt is %s',
                                        attempt_number, r.id, r.attempt_number));
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION runops.dequeue_runs(environment_id text, worker_id text, max_runs integer,
                                               options jsonb DEFAULT '{}')
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
  worker text := require_worker(dequeue_runs.worker_id);
  lease_for interval;
  queues text[];
  tasks text[];
  env environment_context;
  active integer;
  room integer;
  ts timestamptz := now();
  picked text[];
BEGIN
  PERFORM reject_unknown_options(o, ARRAY['lease', 'queues', 'tasks'], 'dequeue');
  PERFORM require_between(max_runs, 1, 1000, 'max_runs');
  lease_for := option_duration(o, 'lease', default_lease());
  IF lease_for < interval '1 second' THEN
    PERFORM raise_error('RO006', 'option lease must be at least 1s');
  END IF;
  queues := option_text_array(o, 'queues');
  tasks := option_text_array(o, 'tasks');
  env := load_environment(dequeue_runs.environment_id);
  IF env.id IS NULL THEN
    PERFORM raise_error('RO004', format('environment %s not found',
                                        quote_nullable(input_prefix(dequeue_runs.environment_id))));
  END IF;
  IF env.paused OR env.archived OR env.project_deleted THEN
    RETURN;  -- a paused environment hands out no work; attempts in flight still complete
  END IF;
  -- Serialise dequeuers of one environment, so the concurrency limit is exact in this store.
  PERFORM pg_advisory_xact_lock(hashtextextended('runops.dequeue:' || env.id, 0));
  SELECT count(*) INTO active FROM runs AS r
  WHERE r.environment_id = env.id AND r.status IN ('DEQUEUED', 'EXECUTING');
  room := least(max_runs, env.maximum_concurrency_limit - active);
  IF room <= 0 THEN
    RETURN;
  END IF;
  PERFORM set_mover('dequeue_runs');
  WITH candidates AS (
    SELECT r.id FROM runs AS r
    WHERE r.environment_id = env.id AND r.status = 'PENDING'
      AND (queues IS NULL OR r.queue = ANY (queues))
      AND (tasks IS NULL OR r.task_identifier = ANY (tasks))
    ORDER BY r.queued_at, r.id
    LIMIT room
    FOR UPDATE SKIP LOCKED
  ), moved AS (
    UPDATE runs AS r
    SET status = 'DEQUEUED', locked_by = worker, lease = lease_for, lease_expires_at = ts + lease_for,
        started_at = coalesce(r.started_at, ts), ttl_expires_at = NULL, updated_at = ts
    FROM candidates AS c WHERE r.id = c.id
    RETURNING r.id
  )
  SELECT array_agg(m.id) INTO picked FROM moved AS m;
  -- A second statement: the UPDATE's new row versions are not visible inside the statement
  -- that made them.
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = ANY (picked) ORDER BY v.queued_at, v.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.heartbeat_run(run_id text, worker_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs := lock_leased_run(heartbeat_run.run_id, heartbeat_run.worker_id, heartbeat_run.environment_id,
                            'heartbeat_run', false);
BEGIN
  UPDATE runs AS x SET lease_expires_at = now() + coalesce(x.lease, default_lease()), updated_at = now()
  WHERE x.id = r.id;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.start_attempt(run_id text, worker_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs := lock_leased_run(start_attempt.run_id, start_attempt.worker_id, start_attempt.environment_id,
                            'start_attempt', true);
  ts timestamptz := now();
  paused attempts;
  next_number integer;
BEGIN
  PERFORM set_mover('start_attempt');
  -- A run resumed from a checkpoint continues the attempt that paused, not a new one.
  SELECT * INTO paused FROM attempts AS a WHERE a.run_id = r.id AND a.status = 'PAUSED'
  ORDER BY a.number DESC LIMIT 1;
  IF FOUND THEN
    UPDATE attempts AS a SET status = 'EXECUTING', worker_id = start_attempt.worker_id WHERE a.id = paused.id;
    next_number := paused.number;
  ELSE
    next_number := r.attempt_number + 1;
    IF next_number > least(r.max_attempts, 250) THEN
      UPDATE runs AS x
      SET status = 'CRASHED', completed_at = ts, locked_by = NULL, lease_expires_at = NULL, updated_at = ts,
          error = jsonb_build_object('message', format('run crashed: all %s attempts were used', r.max_attempts),
                                     'status', 'CRASHED')
      WHERE x.id = r.id;
      RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
      RETURN;
    END IF;
    INSERT INTO attempts (id, run_id, environment_id, number, status, worker_id, started_at)
    VALUES (mint_id(),
            r.id, r.environment_id, next_number, 'EXECUTING', start_attempt.worker_id, ts);
  END IF;
  UPDATE runs AS x
  SET status = 'EXECUTING', attempt_number = next_number,
      lease_expires_at = ts + coalesce(x.lease, default_lease()),
      execution_deadline = ts + x.max_duration, retry_at = NULL, updated_at = ts
  WHERE x.id = r.id;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.complete_attempt(run_id text, attempt_number integer, output jsonb,
                                                   environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := require_between(complete_attempt.attempt_number, 1, 250, 'attempt_number');
  r runs;
BEGIN
  PERFORM check_json_bounds(complete_attempt.output, 'output');
  r := lock_run(complete_attempt.run_id, complete_attempt.environment_id);
  -- The same attempt's completion, repeated (a retried network call), returns the row as it is.
  IF r.status = 'COMPLETED_SUCCESSFULLY' AND r.attempt_number = n THEN
    RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
    RETURN;
  END IF;
  PERFORM require_current_attempt(r, n, 'complete_attempt');
  PERFORM set_mover('complete_attempt');
  UPDATE runs AS x
  SET status = 'COMPLETED_SUCCESSFULLY', output = complete_attempt.output, completed_at = now(),
      locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = now()
  WHERE x.id = r.id;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.fail_attempt(run_id text, attempt_number integer, error jsonb,
                                               retry_at timestamptz DEFAULT NULL, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := require_between(fail_attempt.attempt_number, 1, 250, 'attempt_number');
  r runs;
  ts timestamptz := now();
  named text;
  final_status text;
BEGIN
  PERFORM check_json_bounds(fail_attempt.error, 'error');
  r := lock_run(fail_attempt.run_id, fail_attempt.environment_id);
  IF fail_attempt.error IS NOT NULL AND jsonb_typeof(fail_attempt.error) = 'object' THEN
    named := fail_attempt.error ->> 'status';
  END IF;
  -- A repeated report of the same failed attempt returns the row as it is.
  IF r.status <> 'EXECUTING' AND r.attempt_number = n
     AND EXISTS (SELECT FROM attempts AS a WHERE a.run_id = r.id AND a.number = n AND a.status = 'FAILED')
     AND (r.status = 'RETRYING_AFTER_FAILURE' OR is_final_status(r.status)) THEN
    RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
    RETURN;
  END IF;
  PERFORM require_current_attempt(r, n, 'fail_attempt');
  UPDATE attempts AS a SET status = 'FAILED', error = fail_attempt.error, completed_at = ts
  WHERE a.run_id = r.id AND a.number = n;
  PERFORM set_mover('fail_attempt');
  IF fail_attempt.retry_at IS NOT NULL AND n < least(r.max_attempts, 250) THEN
    UPDATE runs AS x
    SET status = 'RETRYING_AFTER_FAILURE', retry_at = fail_attempt.retry_at, error = fail_attempt.error,
        locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = ts
    WHERE x.id = r.id;
  ELSE
    final_status := CASE WHEN named IN ('COMPLETED_WITH_ERRORS', 'CRASHED', 'SYSTEM_FAILURE', 'TIMED_OUT')
                         THEN named ELSE 'COMPLETED_WITH_ERRORS' END;
    UPDATE runs AS x
    SET status = final_status, error = fail_attempt.error, completed_at = ts, retry_at = NULL,
        locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = ts
    WHERE x.id = r.id;
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_checkpoint(run_id text, attempt_number integer, reason text,
                                                    location text, metadata jsonb DEFAULT '{}',
                                                    environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := require_between(create_checkpoint.attempt_number, 1, 250, 'attempt_number');
  meta jsonb := require_object(create_checkpoint.metadata, 'metadata');
  r runs;
  ts timestamptz := now();
BEGIN
  IF reason IS NULL OR reason NOT IN ('MANUAL', 'WAIT_FOR_DURATION', 'WAIT_FOR_TASK', 'WAIT_FOR_BATCH',
                                      'RETRYING_AFTER_FAILURE') THEN
    PERFORM raise_invalid('checkpoint reason', 'MANUAL, WAIT_FOR_DURATION, WAIT_FOR_TASK, WAIT_FOR_BATCH or '
                          'RETRYING_AFTER_FAILURE', quote_nullable(input_prefix(reason)));
  END IF;
  IF location IS NULL OR location = '' OR length(location) > 2048 THEN
    PERFORM raise_error('RO006', 'checkpoint location must be 1 to 2048 characters');
  END IF;
  PERFORM check_json_bounds(meta, 'metadata');
  r := lock_run(create_checkpoint.run_id, create_checkpoint.environment_id);
  PERFORM require_current_attempt(r, n, 'create_checkpoint');
  INSERT INTO checkpoints (id, run_id, environment_id, attempt_number, reason, location, metadata, created_at)
  VALUES (mint_id(),
          r.id, r.environment_id, n, reason, location, meta, ts);
  UPDATE attempts AS a SET status = 'PAUSED' WHERE a.run_id = r.id AND a.number = n;
  PERFORM set_mover('create_checkpoint');
  UPDATE runs AS x
  SET status = 'WAITING_TO_RESUME', suspended_reason = reason, locked_by = NULL, lease_expires_at = NULL,
      execution_deadline = NULL, updated_at = ts
  WHERE x.id = r.id;
  -- Waiting for something that already happened must not wait at all.
  IF reason <> 'MANUAL' THEN
    BEGIN
      PERFORM refresh_blockers(r.id, true);
    EXCEPTION WHEN SQLSTATE 'RO009' THEN
      NULL;  -- the other store is down: its blockers are re-checked by tick
    END;
    PERFORM resume_if_unblocked(r.id, false);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

-- WAITING_TO_RESUME -> PENDING when no edge of the run is pending. A MANUAL checkpoint resumes
-- only when asked (allow_manual). True when nothing blocks the run any more.
CREATE OR REPLACE FUNCTION runops.resume_if_unblocked(run_id text, allow_manual boolean)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  r runs;
  previous text;
BEGIN
  SELECT * INTO r FROM runs AS x WHERE x.id = resume_if_unblocked.run_id FOR UPDATE;
  IF NOT FOUND OR is_final_status(r.status)
     OR EXISTS (SELECT FROM run_waitpoints AS e WHERE e.run_id = r.id AND e.completed_at IS NULL) THEN
    RETURN false;
  END IF;
  IF r.status = 'WAITING_TO_RESUME' AND (allow_manual OR r.suspended_reason IS DISTINCT FROM 'MANUAL') THEN
    previous := set_mover('resume_run');
    UPDATE runs AS x SET status = 'PENDING', suspended_reason = NULL, updated_at = now() WHERE x.id = r.id;
    PERFORM set_mover(previous);
  END IF;
  RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION runops.resume_run(run_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs := lock_run(resume_run.run_id, resume_run.environment_id);
BEGIN
  -- Idempotent: the client sends it as a follow-up and tick may get there first.
  IF r.status = 'WAITING_TO_RESUME' THEN
    PERFORM refresh_blockers(r.id, true);
    PERFORM resume_if_unblocked(r.id, true);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.finalize_run(run_id text, status text, error jsonb DEFAULT NULL,
                                               output jsonb DEFAULT NULL, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  r runs;
  final_status text := finalize_run.status;
  ts timestamptz := now();
BEGIN
  IF final_status IS NULL OR NOT is_final_status(final_status) THEN
    PERFORM raise_error('RO006', format('finalize_run needs a final status (CANCELED, INTERRUPTED, COMPLETED_SUCCESSFULLY, '
                                        'COMPLETED_WITH_ERRORS, SYSTEM_FAILURE, CRASHED, EXPIRED, TIMED_OUT), got %s',
                                        quote_nullable(input_prefix(final_status))));
  END IF;
  PERFORM check_json_bounds(finalize_run.error, 'error');
  PERFORM check_json_bounds(finalize_run.output, 'output');
  r := lock_run(finalize_run.run_id, finalize_run.environment_id);
  -- Repeating the call that made the run final returns it unchanged.
  IF r.status = final_status THEN
    RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
    RETURN;
  END IF;
  PERFORM set_mover('finalize_run');
  -- One write: status, error and output land together, so no reader sees a final run without them.
  UPDATE runs AS x
  SET status = final_status,
      error = coalesce(finalize_run.error, x.error),
      output = coalesce(finalize_run.output, x.output),
      completed_at = ts,
      expired_at = CASE WHEN final_status = 'EXPIRED' THEN ts ELSE x.expired_at END,
      locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = ts
  WHERE x.id = r.id;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

-- Cancels the live runs of the trees under the given (bare) root ids; returns how many.
CREATE OR REPLACE FUNCTION runops.cancel_trees(root_ids text[], reason text)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  canceled integer;
BEGIN
  PERFORM set_mover('cancel_run');
  WITH RECURSIVE tree AS (
    SELECT r.id FROM runs AS r WHERE r.id = ANY (root_ids)
    UNION
    SELECT c.id FROM runs AS c JOIN tree AS t ON c.parent_run_id = t.id
  ), live AS (
    SELECT r.id FROM runs AS r JOIN tree AS t ON t.id = r.id
    WHERE NOT is_final_status(r.status)
    ORDER BY r.depth DESC, r.id   -- descendants first: see cancel_run
    FOR UPDATE OF r
  )
  UPDATE runs AS x
  SET status = 'CANCELED', completed_at = ts, locked_by = NULL, lease_expires_at = NULL,
      execution_deadline = NULL, updated_at = ts,
      error = jsonb_build_object('message', coalesce(reason, 'run was canceled'), 'status', 'CANCELED')
  FROM live AS l WHERE x.id = l.id AND NOT is_final_status(x.status);
  GET DIAGNOSTICS canceled = ROW_COUNT;
  RETURN canceled;
END
$$;

CREATE OR REPLACE FUNCTION runops.cancel_run(run_id text, reason text DEFAULT NULL, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text;
  r runs;
BEGIN
  IF length(reason) > 2048 THEN
    PERFORM raise_error('RO006', 'cancel reason must be at most 2048 characters');
  END IF;
  bare := require_local_id(cancel_run.run_id, 'run', 'run_id');
  -- Not locked here: cancel_trees locks the whole tree, descendants before ancestors, the order
  -- in which a finishing child locks itself and then its waiting parent.
  SELECT * INTO r FROM runs AS x WHERE x.id = bare;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('run %s not found', cancel_run.run_id));
  END IF;
  PERFORM require_row_environment(r.environment_id, cancel_run.environment_id, 'run', cancel_run.run_id);
  -- Canceling a final run changes nothing (and repeating a cancel returns the same row).
  IF NOT is_final_status(r.status) THEN
    PERFORM cancel_trees(ARRAY[r.id], reason);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.cancel_dev_session_runs(environment_id text, dev_session_id text)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  roots text[];
BEGIN
  IF dev_session_id IS NULL OR dev_session_id = '' THEN
    PERFORM raise_error('RO006', 'dev_session_id is required');
  END IF;
  SELECT array_agg(r.id ORDER BY r.id) INTO roots FROM runs AS r
  WHERE r.environment_id = cancel_dev_session_runs.environment_id
    AND r.dev_session_id = cancel_dev_session_runs.dev_session_id AND NOT is_final_status(r.status);
  IF roots IS NULL THEN
    RETURN 0;
  END IF;
  RETURN cancel_trees(roots, 'the dev session ended');
END
$$;

CREATE OR REPLACE FUNCTION runops.execute_tasks_waiting_for_deploy(environment_id text, task_identifiers text[])
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  ts timestamptz := now();
  n integer;
BEGIN
  IF task_identifiers IS NULL OR cardinality(task_identifiers) = 0 THEN
    PERFORM raise_error('RO006', 'task_identifiers must name at least one task');
  END IF;
  PERFORM set_mover('execute_tasks_waiting_for_deploy');
  WITH waiting AS (
    SELECT r.id FROM runs AS r
    WHERE r.environment_id = execute_tasks_waiting_for_deploy.environment_id
      AND r.task_identifier = ANY (task_identifiers)
      AND r.status IN ('WAITING_FOR_DEPLOY', 'PENDING_VERSION')
    ORDER BY r.id FOR UPDATE  -- a one-shot call: wait for a locked run rather than leave it behind
  )
  UPDATE runs AS r SET status = 'PENDING', queued_at = ts, ttl_expires_at = ts + r.ttl, updated_at = ts
  FROM waiting WHERE r.id = waiting.id;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- sql/functions/listing.sql
-- Listing an environment's runs across both stores (SPEC §4, list_runs).
--
--   list_runs        the merged listing: this store's page and the other store's, merged
--   list_store_runs  this store's page only (the client asks both stores and merges itself)
--   open_run_page    a page's arguments, checked once for both
--   run_cursor / parse_run_cursor   the cursor format shared with the client
--   parse_list_filters               statuses, task_identifiers, tags, created_after/_before, batch_id
--
-- Order: created_at DESC, then the bare id DESC in byte order. A cursor resumes strictly after
-- its row: base64url (no padding) of the JSON text {"c": created_at in µs, "r": bare id}.
-- Each side is a keyset query — created_at <= c AND (created_at < c OR (created_at = c AND
-- id < r)), which the index (environment_id, created_at DESC, id DESC) answers from the
-- cursor on and postgres_fdw ships whole — limited to the page size, so a merged page reads at
-- most two pages, however many runs are stored.

CREATE OR REPLACE FUNCTION runops.run_cursor(created_at timestamptz, id text)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT rtrim(translate(encode(convert_to(
           jsonb_build_object('c', (extract(epoch FROM created_at) * 1000000)::bigint, 'r', id)::text, 'UTF8'),
           'base64'), E'+/\n', '-_'), '=')
$$;

CREATE OR REPLACE FUNCTION runops.parse_run_cursor(cursor text, OUT created_at timestamptz, OUT id text)
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  padded text;
  doc jsonb;
BEGIN
  IF cursor IS NULL THEN
    RETURN;
  END IF;
  BEGIN
    padded := translate(cursor, '-_', '+/');
    padded := padded || repeat('=', (4 - length(padded) % 4) % 4);
    doc := convert_from(decode(padded, 'base64'), 'UTF8')::jsonb;
    created_at := to_timestamp(0) + ((doc ->> 'c')::bigint * interval '1 microsecond');
    id := doc ->> 'r';
  EXCEPTION WHEN OTHERS THEN
    doc := NULL;
  END;
  IF doc IS NULL OR jsonb_typeof(doc -> 'c') <> 'number' OR jsonb_typeof(doc -> 'r') <> 'string'
     OR length(id) NOT BETWEEN 1 AND 64 THEN
    PERFORM raise_error('RO006', format('cursor %s is not a list_runs cursor', left(quote_literal(cursor), 100)),
                        NULL, 'pass the cursor column of a row list_runs returned, or NULL for the first page');
  END IF;
END
$$;

CREATE OR REPLACE FUNCTION runops.parse_list_filters(filters jsonb)
RETURNS runops.list_filters
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  f jsonb := require_object(filters, 'filters');
  result list_filters;
  raw text;
BEGIN
  IF (f - ARRAY['statuses', 'task_identifiers', 'tags', 'created_after', 'created_before', 'batch_id']) <> '{}'::jsonb THEN
    PERFORM reject_unknown_options(f, ARRAY['statuses', 'task_identifiers', 'tags', 'created_after', 'created_before',
                                            'batch_id'], 'list_runs filter');
  END IF;
  result.statuses := option_text_array(f, 'statuses');
  IF EXISTS (SELECT FROM unnest(result.statuses) AS s
             WHERE NOT EXISTS (SELECT FROM status_transitions AS t WHERE t.to_status = s)) THEN
    PERFORM raise_error('RO006', 'filter statuses names an unknown status');
  END IF;
  result.task_identifiers := option_text_array(f, 'task_identifiers');
  result.tags := option_text_array(f, 'tags');
  raw := option_text(f, 'created_after');
  IF raw IS NOT NULL THEN
    result.created_after := parse_timestamp(raw, 'filter created_after');
  END IF;
  raw := option_text(f, 'created_before');
  IF raw IS NOT NULL THEN
    result.created_before := parse_timestamp(raw, 'filter created_before');
  END IF;
  raw := option_text(f, 'batch_id');
  IF raw IS NOT NULL THEN
    result.batch_id := bare_id(raw, 'batch');
    IF result.batch_id IS NULL THEN
      PERFORM raise_error('RO006', format('filter batch_id %s is not a batch id', left(raw, 100)));
    END IF;
    -- Friendly on purpose: it is compared with run_view.batch_id as a plain column = parameter,
    -- which postgres_fdw ships to the other store's view (docs/listing.md).
    result.batch_id := 'batch_' || result.batch_id;
  END IF;
  RETURN result;
END
$$;

CREATE OR REPLACE FUNCTION runops.require_page_size(page_size integer)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF page_size IS NULL OR page_size NOT BETWEEN 1 AND 200 THEN
    PERFORM raise_invalid('page_size', '1 to 200', quote_nullable(page_size));
  END IF;
  RETURN page_size;
END
$$;

-- The arguments of a page, checked once for list_store_runs and list_runs: RO006 for a bad page
-- size, filter or cursor, or no environment. Out come the environment, the page size, the
-- keyset position (c, r; first_page: no cursor) and each filter as a field of its own, so both
-- sides' queries compare columns with plain parameters, which postgres_fdw ships.
CREATE OR REPLACE FUNCTION runops.open_run_page(environment_id text, page_size integer, cursor text, filters jsonb,
                                                OUT env_id text, OUT n integer, OUT c timestamptz, OUT r text,
                                                OUT first_page boolean, OUT statuses text[],
                                                OUT task_identifiers text[], OUT tags text[],
                                                OUT created_after timestamptz, OUT created_before timestamptz,
                                                OUT batch_id text)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  f list_filters;
  after record;
BEGIN
  n := require_page_size(page_size);
  f := parse_list_filters(filters);
  after := parse_run_cursor(cursor);
  IF environment_id IS NULL OR environment_id = '' THEN
    PERFORM raise_error('RO006', 'environment_id is required');
  END IF;
  env_id := environment_id;
  c := coalesce(after.created_at, 'infinity');
  r := coalesce(after.id, '');
  first_page := after.id IS NULL;
  statuses := f.statuses;
  task_identifiers := f.task_identifiers;
  tags := f.tags;
  created_after := f.created_after;
  created_before := f.created_before;
  batch_id := f.batch_id;
END
$$;

-- One store's page. Every predicate is a plain comparison with a parameter, so the same text
-- serves the local table and, through postgres_fdw, the other store (shipped whole, ORDER BY and
-- LIMIT included: see docs/listing.md for EXPLAIN VERBOSE).
CREATE OR REPLACE FUNCTION runops.list_store_runs(environment_id text, page_size integer DEFAULT 25,
                                                  cursor text DEFAULT NULL, filters jsonb DEFAULT '{}')
RETURNS SETOF runops.run_page_row
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  p record := open_run_page(environment_id, page_size, cursor, filters);
BEGIN
  RETURN QUERY
  SELECT v.*, run_cursor(v.created_at, v.id)
  FROM run_view AS v
  WHERE v.environment_id = p.env_id
    AND v.created_at <= p.c AND (v.created_at < p.c OR (v.created_at = p.c AND v.id < p.r) OR p.first_page)
    AND (p.statuses IS NULL OR v.status = ANY (p.statuses))
    AND (p.task_identifiers IS NULL OR v.task_identifier = ANY (p.task_identifiers))
    AND (p.tags IS NULL OR v.tags @> p.tags)
    AND (p.created_after IS NULL OR v.created_at > p.created_after)
    AND (p.created_before IS NULL OR v.created_at < p.created_before)
    AND (p.batch_id IS NULL OR v.batch_id = p.batch_id)
  ORDER BY v.created_at DESC, v.id DESC
  LIMIT p.n;
END
$$;

CREATE OR REPLACE FUNCTION runops.list_runs(environment_id text, page_size integer DEFAULT 25,
                                            cursor text DEFAULT NULL, filters jsonb DEFAULT '{}')
RETURNS SETOF runops.run_page_row
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  p record := open_run_page(environment_id, page_size, cursor, filters);
BEGIN
  -- A store that was never split, or never wired, has no other side to read.
  IF NOT claims_required() THEN
    RETURN QUERY SELECT * FROM list_store_runs(p.env_id, p.n, cursor, filters);
    RETURN;
  END IF;
  BEGIN
    -- This store's page is list_store_runs'; the other store's is the same keyset query spelled
    -- out over runops_peer.run_list_view, a plain scan postgres_fdw ships with its WHERE and
    -- ORDER BY (the cursor is computed here, on the page's rows). It stays spelled out: EXECUTE
    -- over either relation would plan (and ask the remote for estimates) on every page, and an
    -- inlined SQL predicate takes one input collation for all its text arguments (the id's "C"),
    -- which risks the shipping of the default-collation filter columns.
    RETURN QUERY
    SELECT *
    FROM ((SELECT * FROM list_store_runs(p.env_id, p.n, cursor, filters))
          UNION ALL
          (SELECT v.*, run_cursor(v.created_at, v.id) FROM runops_peer.run_list_view AS v
           WHERE v.environment_id = p.env_id
             AND v.created_at <= p.c AND (v.created_at < p.c OR (v.created_at = p.c AND v.id < p.r) OR p.first_page)
             AND (p.statuses IS NULL OR v.status = ANY (p.statuses))
             AND (p.task_identifiers IS NULL OR v.task_identifier = ANY (p.task_identifiers))
             AND (p.tags IS NULL OR v.tags @> p.tags)
             AND (p.created_after IS NULL OR v.created_at > p.created_after)
             AND (p.created_before IS NULL OR v.created_at < p.created_before)
             AND (p.batch_id IS NULL OR v.batch_id = p.batch_id)
           ORDER BY v.created_at DESC, v.id DESC LIMIT p.n)) AS u
    ORDER BY u.created_at DESC, u.id DESC
    LIMIT p.n;
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', 'the other store is unavailable for the merged listing: ' || SQLERRM,
                        NULL, 'list each store with list_store_runs, or retry when it is back');
  END;
END
$$;

-- sql/functions/metrics.sql
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
  mirror jsonb;
  sub record;
BEGIN
  IF env_id = '' THEN
    PERFORM raise_error('RO006', 'environment_id must not be empty (omit it, or pass NULL, for every environment)');
  END IF;
  IF octet_length(env_id) > 255 THEN
    PERFORM raise_error('RO006', 'environment_id is too long: ' || left(env_id, 100));
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
    'mirror', mirror);
END
$$;

-- sql/functions/minting.sql
-- Minting ids in this store's shape (SPEC §2): KSUIDs on run-ops, cuids on the control plane.
--
--   generate_ksuid / generate_cuid  public: one bare id of either shape
--   ksuid_timestamp                 public: when a KSUID was minted
--   mint_id                         one fresh id of this store's shape
--   mint_ids                        n ids for a batch chunk (one minted, a counter in its tail)
--   ksuid_encode, base62_digits*, base36_digits*   the encoders behind them
-- These are plain functions (no SECURITY DEFINER): they read nothing a caller may not see.

-- 20 raw bytes (4-byte big-endian seconds since 1 400 000 000, 16 random) to 27 base62 chars.
-- Two numeric divisions by 62^10 leave bigint-sized parts, so the digit loop stays in bigint.
CREATE OR REPLACE FUNCTION runops.ksuid_encode(raw bytea)
RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
  alphabet constant text := '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
  p10 constant bigint := 839299365868340224;   -- 62^10
  n numeric := 0::numeric;
  part bigint;
  encoded text := '';
BEGIN
  IF pg_catalog.length(raw) <> 20 THEN
    RAISE EXCEPTION 'a KSUID is 20 bytes, got %', pg_catalog.length(raw) USING ERRCODE = 'RO006';
  END IF;
  FOR i IN 0..4 LOOP
    n := n * 4294967296::numeric
         + ((pg_catalog.get_byte(raw, 4 * i)::bigint << 24)
            | (pg_catalog.get_byte(raw, 4 * i + 1)::bigint << 16)
            | (pg_catalog.get_byte(raw, 4 * i + 2)::bigint << 8)
            | pg_catalog.get_byte(raw, 4 * i + 3)::bigint)::numeric;
  END LOOP;
  FOR p IN 1..3 LOOP
    IF p < 3 THEN
      part := pg_catalog.mod(n, p10::numeric)::bigint;
      n := pg_catalog.div(n, p10::numeric);
    ELSE
      part := n::bigint;
    END IF;
    FOR i IN 1..(CASE WHEN p < 3 THEN 10 ELSE 7 END) LOOP
      encoded := pg_catalog.substr(alphabet, (part % 62)::integer + 1, 1) || encoded;
      part := part / 62;
    END LOOP;
  END LOOP;
  RETURN encoded;
END
$$;

-- Fixed-width base62 and base36 digits of a bigint. The four-digit forms are unrolled (one
-- expression, no loop); the wider ones are made of them. All inline into their callers.
CREATE OR REPLACE FUNCTION runops.base62_digits4(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (v / 238328 % 62)::integer + 1, 1)
      || pg_catalog.substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (v / 3844 % 62)::integer + 1, 1)
      || pg_catalog.substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (v / 62 % 62)::integer + 1, 1)
      || pg_catalog.substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (v % 62)::integer + 1, 1)
$$;

CREATE OR REPLACE FUNCTION runops.base62_digits7(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.right(runops.base62_digits4(v / 14776336), 3) || runops.base62_digits4(v % 14776336)  -- 62^4
$$;

CREATE OR REPLACE FUNCTION runops.base62_digits10(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.right(runops.base62_digits4(v / 218340105584896), 2)                          -- 62^8
      || runops.base62_digits4(v / 14776336 % 14776336) || runops.base62_digits4(v % 14776336)    -- 62^4
$$;

CREATE OR REPLACE FUNCTION runops.base36_digits4(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.substr('0123456789abcdefghijklmnopqrstuvwxyz', (v / 46656 % 36)::integer + 1, 1)
      || pg_catalog.substr('0123456789abcdefghijklmnopqrstuvwxyz', (v / 1296 % 36)::integer + 1, 1)
      || pg_catalog.substr('0123456789abcdefghijklmnopqrstuvwxyz', (v / 36 % 36)::integer + 1, 1)
      || pg_catalog.substr('0123456789abcdefghijklmnopqrstuvwxyz', (v % 36)::integer + 1, 1)
$$;

CREATE OR REPLACE FUNCTION runops.base36_digits8(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT runops.base36_digits4(v / 1679616 % 1679616) || runops.base36_digits4(v % 1679616)       -- 36^4
$$;

-- A KSUID: 32-bit seconds since the KSUID epoch, then a 128-bit payload taken from the random
-- bytes of v4 UUIDs (core only: no pgcrypto; a v4 UUID fixes 6 of its 128 bits, so the payload
-- holds at least 122 random bits). The 160-bit number is cut into 7 + 10 + 10 base62 digits with
-- two numeric divisions; each part is a bigint, written out by an unrolled expression.
CREATE OR REPLACE FUNCTION runops.generate_ksuid()
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
AS $$
DECLARE
  p10 constant numeric := 839299365868340224;   -- 62^10
  bytes bytea := pg_catalog.uuid_send(pg_catalog.gen_random_uuid()) || pg_catalog.uuid_send(pg_catalog.gen_random_uuid());
  n numeric := (pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()))::bigint - 1400000000)::numeric
                 * 340282366920938463463374607431768211456                                     -- 2^128
               + (('x' || pg_catalog.encode(pg_catalog.substr(bytes, 1, 8), 'hex'))::bit(64)::bigint::numeric
                  + 9223372036854775808) * 18446744073709551616                                -- high 64 bits
               + ('x' || pg_catalog.encode(pg_catalog.substr(bytes, 17, 8), 'hex'))::bit(64)::bigint::numeric
               + 9223372036854775808;                                                         -- low 64 bits
  low bigint := pg_catalog.mod(n, p10)::bigint;
  middle bigint;
BEGIN
  n := pg_catalog.div(n, p10);
  middle := pg_catalog.mod(n, p10)::bigint;
  RETURN runops.base62_digits7(pg_catalog.div(n, p10)::bigint) || runops.base62_digits10(middle)
         || runops.base62_digits10(low);
END
$$;

-- cuid v1 layout: 'c' + ms timestamp (8) + counter (4) + fingerprint (4) + random (8), base36.
CREATE OR REPLACE FUNCTION runops.generate_cuid()
RETURNS text
LANGUAGE sql VOLATILE
AS $$
  SELECT 'c'
      || runops.base36_digits8((pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000)::bigint)
      || runops.base36_digits4(pg_catalog.nextval('runops.cuid_counter'))
      || runops.base36_digits4((pg_catalog.pg_backend_pid() % 1296) * 1296
                               + abs(pg_catalog.hashtext(pg_catalog.current_database())) % 1296)
      || runops.base36_digits8(('x' || pg_catalog.encode(pg_catalog.substr(pg_catalog.uuid_send(pg_catalog.gen_random_uuid()), 1, 6), 'hex'))::bit(48)::bigint
                               % 2821109907456)
$$;

CREATE OR REPLACE FUNCTION runops.ksuid_timestamp(id text)
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  bare text := pg_catalog.regexp_replace(id, '^[a-z]+_', '');
  n numeric := 0::numeric;
  ch integer;
BEGIN
  IF runops.try_classify_residency(id) IS DISTINCT FROM 'NEW' THEN
    RAISE EXCEPTION 'not a KSUID: %', pg_catalog.quote_nullable(id)
      USING ERRCODE = 'RO001', HINT = 'ksuid_timestamp reads the time out of 27-character KSUIDs only';
  END IF;
  FOR i IN 1..27 LOOP
    ch := pg_catalog.ascii(pg_catalog.substr(bare, i, 1));
    n := n * 62::numeric
         + (CASE WHEN ch <= 57 THEN ch - 48 WHEN ch <= 90 THEN ch - 55 ELSE ch - 61 END)::numeric;
  END LOOP;
  -- The top 32 of 160 bits are the seconds since the KSUID epoch.
  RETURN pg_catalog.to_timestamp((1400000000::numeric
         + pg_catalog.div(n, 340282366920938463463374607431768211456::numeric))::double precision);
END
$$;

-- One fresh id of this store's shape. PL/pgSQL, not a SQL CASE: PostgreSQL prepares every
-- branch of an expression in each transaction, and the cuid branch alone cost 25 us there.
CREATE OR REPLACE FUNCTION runops.mint_id()
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  IF local_residency() = 'NEW' THEN
    RETURN next_ksuid();
  END IF;
  RETURN generate_cuid();
END
$$;

-- The KSUID a new run gets: cheap per call, because a session keeps what it minted last.
-- generate_ksuid costs ~70 us at the top of a transaction (PL/pgSQL builds its ~30 expression
-- nodes again in every transaction), a quarter of a trigger. So once per second (and once per
-- 62^4 ids) a session mints a real KSUID and keeps its first 23 characters; each id then is that
-- prefix and 4 base62 digits of a counter that starts at a random offset. The ids stay
-- KSUID-shaped, time-ordered to the second, unique (sessions differ in ~100 random bits of the
-- prefix) and below the maximum; what they give up is that ids of one session and second are
-- neighbours, not independent draws (docs/decisions.md, "How much randomness an id keeps").
-- The state lives in a session setting: '<epoch second>:<prefix>:<next counter>'.
CREATE OR REPLACE FUNCTION runops.next_ksuid()
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  state text := pg_catalog.current_setting('runops.ksuid_state', true);
  second text := pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()))::bigint::text;
  counter bigint;
BEGIN
  IF state IS NULL OR pg_catalog.split_part(state, ':', 1) <> second
     OR pg_catalog.split_part(state, ':', 3)::bigint >= 14776336 THEN                  -- 62^4
    -- A fresh prefix; the counter starts low enough to leave a million ids of room.
    state := second || ':' || pg_catalog.left(runops.generate_ksuid(), 23) || ':'
             || pg_catalog.floor(pg_catalog.random() * 13776336)::bigint;
  END IF;
  counter := pg_catalog.split_part(state, ':', 3)::bigint;
  PERFORM pg_catalog.set_config('runops.ksuid_state',
                                pg_catalog.left(state, pg_catalog.length(second) + 25) || (counter + 1), false);
  RETURN pg_catalog.substr(state, pg_catalog.length(second) + 2, 23) || runops.base62_digits4(counter);
END
$$;

-- n fresh ids of this store's shape, in ascending byte order, for one chunk of a batch.
-- Minting each id in PL/pgSQL costs ~15 us; instead one id is minted and its last four
-- characters replaced by a counter starting at a random offset: the ids keep the timestamp and
-- about 100 random bits of the minted one, stay unique, and cost one expression each.
CREATE OR REPLACE FUNCTION runops.mint_ids(n integer)
RETURNS text[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  prefix text;
  base bigint;
  span bigint := CASE WHEN local_residency() = 'NEW' THEN 14776336 ELSE 1679616 END;  -- 62^4, 36^4
BEGIN
  IF n <= 0 THEN
    RETURN '{}'::text[];
  END IF;
  base := floor(random() * (span - n))::bigint;
  IF local_residency() = 'NEW' THEN
    prefix := left(generate_ksuid(), 23);
    RETURN ARRAY(SELECT prefix || base62_digits4(base + i) FROM generate_series(0, n - 1) AS i ORDER BY i);
  END IF;
  prefix := left(generate_cuid(), 21);
  RETURN ARRAY(SELECT prefix || base36_digits4(base + i) FROM generate_series(0, n - 1) AS i ORDER BY i);
END
$$;

-- sql/functions/options.sql
-- Parsing options: the one grammar for durations, timestamps and option values (SPEC §3), and
-- the parsers of the two option sets built from it.
--
--   parse_duration, parse_timestamp, duration_text   durations (^\d+(s|m|h|d|w)$, <= 365 days) and back
--   parse_moment           "a duration from now, or a timestamp with an offset" (delay, completed_after)
--   require_object, reject_unknown_options             the options object and its names
--   option_value           options[key], absent and JSON null alike as NULL: where every reader starts
--   option_text, option_integer, option_boolean, option_text_array   one typed value each
--   option_duration, option_moment, option_id, option_idempotency_key,
--   option_resume_parent   the options several parsers share, read and checked once
--   parse_trigger_options   trigger_run's options -> trigger_spec, with the defaults
--   parse_batch_options     batch_trigger/create_batch's options

-- Durations everywhere share one grammar: digits and one unit, at most 365 days.
CREATE OR REPLACE FUNCTION runops.parse_duration(value text, what text)
RETURNS interval
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  amount numeric;
  parsed interval;
BEGIN
  IF value IS NULL OR value !~ '^\d{1,12}(s|m|h|d|w)$' THEN
    PERFORM raise_invalid(what, 'a duration like 30s, 10m, 2h, 7d or 1w', quote_nullable(input_prefix(value)));
  END IF;
  -- Bound the seconds before building an interval: 999999999999w would overflow it.
  amount := left(value, -1)::numeric * CASE right(value, 1)
              WHEN 's' THEN 1 WHEN 'm' THEN 60 WHEN 'h' THEN 3600 WHEN 'd' THEN 86400 ELSE 604800 END;
  IF amount > 365 * 86400 THEN
    PERFORM raise_invalid(what, 'at most 365 days', value);
  END IF;
  parsed := make_interval(secs => amount::double precision);
  RETURN parsed;
END
$$;

-- A timestamp from the caller must say which offset it is in: a bare local time is ambiguous.
CREATE OR REPLACE FUNCTION runops.parse_timestamp(value text, what text)
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF value !~ '^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}(:?\d{2})?)$' THEN
    PERFORM raise_invalid(what, 'a duration or a timestamp with an offset (2030-01-01T00:00:00Z)',
                          quote_nullable(input_prefix(value)));
  END IF;
  RETURN value::timestamptz;
EXCEPTION
  WHEN data_exception THEN  -- month 13, offset +99, ...: any bad timestamp is the caller's input
    PERFORM raise_error('RO006', format('%s is not a valid timestamp: %s', what, input_prefix(value)));
    RETURN NULL;
END
$$;

-- A point in time a caller may give either way: a duration counts from ts, anything else must be a
-- timestamp with an offset. NULL stays NULL.
CREATE OR REPLACE FUNCTION runops.parse_moment(value text, what text, ts timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
  SELECT CASE WHEN value ~ '^\d+[smhdw]$' THEN ts + parse_duration(value, what)
              WHEN value IS NOT NULL THEN parse_timestamp(value, what) END
$$;

CREATE OR REPLACE FUNCTION runops.duration_text(d interval)
RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
  SELECT CASE
           WHEN s % 604800 = 0 AND s > 0 THEN (s / 604800) || 'w'
           WHEN s % 86400 = 0 AND s > 0 THEN (s / 86400) || 'd'
           WHEN s % 3600 = 0 AND s > 0 THEN (s / 3600) || 'h'
           WHEN s % 60 = 0 AND s > 0 THEN (s / 60) || 'm'
           ELSE s || 's'
         END
  FROM (SELECT extract(epoch FROM d)::bigint AS s) AS x
$$;

CREATE OR REPLACE FUNCTION runops.require_object(value jsonb, what text)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF value IS NULL THEN
    RETURN '{}'::jsonb;
  END IF;
  IF jsonb_typeof(value) <> 'object' THEN
    PERFORM raise_invalid(what, 'a JSON object', jsonb_typeof(value));
  END IF;
  RETURN value;
END
$$;

-- options[key] as the caller gave it. An absent option and a JSON null both mean "not given":
-- NULL, which every reader below returns as is (jsonb_typeof(NULL) is NULL, so no check fires).
CREATE OR REPLACE FUNCTION runops.option_value(options jsonb, key text)
RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
  SELECT nullif(options -> key, 'null'::jsonb)
$$;

-- Reads options[key] as the JSON type a caller must use. At most max_length characters and never
-- more than 2048 bytes (max_index_text_bytes): option texts end up in btree indexes (keys,
-- queues), whose entries must stay under ~2.7 kB. A wrong type is named by its JSON type, not
-- quoted: the value may be a large object.
CREATE OR REPLACE FUNCTION runops.option_text(options jsonb, key text, max_length integer DEFAULT 2048)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  value jsonb := option_value(options, key);
  result text := value #>> '{}';
BEGIN
  IF jsonb_typeof(value) <> 'string' THEN
    PERFORM raise_invalid('option ' || key, 'a string', jsonb_typeof(value));
  END IF;
  IF length(result) > max_length THEN
    PERFORM raise_error('RO006', format('option %s is %s characters long; the limit is %s',
                                         key, length(result), max_length));
  END IF;
  IF octet_length(result) > max_index_text_bytes() THEN
    PERFORM raise_error('RO006', format('option %s is %s bytes long in UTF-8; the limit is %s bytes',
                                         key, octet_length(result), max_index_text_bytes()));
  END IF;
  RETURN result;
END
$$;

CREATE OR REPLACE FUNCTION runops.option_integer(options jsonb, key text, min_value integer, max_value integer)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  value jsonb := option_value(options, key);
BEGIN
  -- The digits are checked before the cast, so 1e99 or 1.5 is the caller's error, not an overflow.
  IF jsonb_typeof(value) <> 'number' OR (value #>> '{}') !~ '^-?\d{1,10}$'
     OR (value #>> '{}')::bigint NOT BETWEEN min_value AND max_value THEN
    PERFORM raise_invalid('option ' || key, format('an integer from %s to %s', min_value, max_value),
                          input_prefix(value::text));
  END IF;
  RETURN (value #>> '{}')::integer;
END
$$;

CREATE OR REPLACE FUNCTION runops.option_boolean(options jsonb, key text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  value jsonb := option_value(options, key);
BEGIN
  IF jsonb_typeof(value) <> 'boolean' THEN
    PERFORM raise_invalid('option ' || key, 'true or false', input_prefix(value::text));
  END IF;
  RETURN value::text::boolean;
END
$$;

CREATE OR REPLACE FUNCTION runops.option_text_array(options jsonb, key text)
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  value jsonb := option_value(options, key);
BEGIN
  IF jsonb_typeof(value) <> 'array' OR jsonb_array_length(value) = 0
     OR EXISTS (SELECT FROM jsonb_array_elements(value) AS v WHERE jsonb_typeof(v) <> 'string') THEN
    PERFORM raise_invalid('option ' || key, 'a non-empty array of strings');
  END IF;
  IF value IS NULL THEN
    RETURN NULL;  -- not given: no filter at all, where '{}' would match nothing
  END IF;
  RETURN ARRAY(SELECT jsonb_array_elements_text(value));
END
$$;

-- A duration option (idempotency_key_ttl, ttl, seal_timeout, lease, ...), default_value when not given.
CREATE OR REPLACE FUNCTION runops.option_duration(options jsonb, key text, default_value interval)
RETURNS interval
LANGUAGE sql IMMUTABLE
AS $$
  SELECT CASE WHEN raw IS NULL THEN default_value ELSE parse_duration(raw, 'option ' || key) END
  FROM option_text(options, key) AS raw
$$;

-- A point-in-time option (delay, completed_after): a duration from ts or a timestamp; NULL when
-- not given.
CREATE OR REPLACE FUNCTION runops.option_moment(options jsonb, key text, ts timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
  SELECT parse_moment(option_text(options, key), 'option ' || key, ts)
$$;

-- An id option (parent_run_id, run_id, batch_id), bare: the friendly prefix of its kind is
-- stripped, another kind's is RO006.
CREATE OR REPLACE FUNCTION runops.option_id(options jsonb, key text, kind text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  raw text := option_text(options, key);
  bare text := bare_id(raw, kind);
BEGIN
  IF raw IS NOT NULL AND bare IS NULL THEN
    PERFORM raise_error('RO006', format('option %s %s is not a %s id', key, input_prefix(raw), kind));
  END IF;
  RETURN bare;
END
$$;

-- The idempotency_key option of runs, batches and waitpoints: 1 to 2048 characters when given.
CREATE OR REPLACE FUNCTION runops.option_idempotency_key(options jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  key text := option_text(options, 'idempotency_key', 2048);
BEGIN
  IF key = '' THEN
    PERFORM raise_error('RO006', 'option idempotency_key must not be empty');
  END IF;
  RETURN key;
END
$$;

-- resume_parent_on_completion (false when not given) of a run or batch: only with a parent to resume.
CREATE OR REPLACE FUNCTION runops.option_resume_parent(options jsonb, parent_run_id text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  resume boolean := coalesce(option_boolean(options, 'resume_parent_on_completion'), false);
BEGIN
  IF resume AND parent_run_id IS NULL THEN
    PERFORM raise_error('RO006', 'option resume_parent_on_completion needs parent_run_id');
  END IF;
  RETURN resume;
END
$$;

-- Unknown option names are refused rather than ignored: a typo must not silently drop a key.
CREATE OR REPLACE FUNCTION runops.reject_unknown_options(options jsonb, allowed text[], what text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  unknown text;
BEGIN
  SELECT k INTO unknown FROM jsonb_object_keys(options) AS k WHERE k <> ALL (allowed) ORDER BY k LIMIT 1;
  IF unknown IS NOT NULL THEN
    PERFORM raise_error('RO006', format('unknown %s option %s', what, quote_literal(input_prefix(unknown))),
                        NULL, 'accepted: ' || array_to_string(allowed, ', '));
  END IF;
END
$$;

-- Options that are exactly one valid idempotency key: the common keyed trigger, which
-- parse_trigger_options and trigger_run's fast path take without the other checks.
CREATE OR REPLACE FUNCTION runops.only_a_valid_key(options jsonb)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  -- CASE, not AND: deleting a key from a non-object raises, and AND does not promise an order.
  SELECT CASE WHEN jsonb_typeof(options) = 'object'
              THEN options - 'idempotency_key' = '{}'::jsonb AND jsonb_typeof(options -> 'idempotency_key') = 'string'
                   AND length(options ->> 'idempotency_key') BETWEEN 1 AND 2048
                   AND octet_length(options ->> 'idempotency_key') <= runops.max_index_text_bytes()
              ELSE false END
$$;

CREATE OR REPLACE FUNCTION runops.parse_trigger_options(options jsonb)
RETURNS runops.trigger_spec
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
  spec trigger_spec;
  tags jsonb := o -> 'tags';
  allowed constant text[] := ARRAY[
    'idempotency_key', 'idempotency_key_scope', 'idempotency_key_ttl', 'parent_run_id',
    'parent_attempt_number', 'resume_parent_on_completion', 'delay', 'ttl', 'max_duration', 'queue',
    'concurrency_key', 'tags', 'max_attempts', 'metadata', 'run_id', 'batch_id', 'batch_index',
    'dev_session_id'];
BEGIN
  -- The common cases, no options at all or only a valid key, skip every check below.
  IF o = '{}'::jsonb OR only_a_valid_key(o) THEN
    spec := no_options();
    spec.idempotency_key := o ->> 'idempotency_key';  -- NULL without options
    RETURN spec;
  END IF;
  IF (o - allowed) <> '{}'::jsonb THEN
    PERFORM reject_unknown_options(o, allowed, 'trigger');
  END IF;

  spec.idempotency_key := option_idempotency_key(o);
  spec.idempotency_key_scope := coalesce(option_text(o, 'idempotency_key_scope'), 'run');
  IF spec.idempotency_key_scope NOT IN ('run', 'attempt', 'global') THEN
    PERFORM raise_invalid('option idempotency_key_scope', 'run, attempt or global', spec.idempotency_key_scope);
  END IF;
  spec.idempotency_key_ttl := option_duration(o, 'idempotency_key_ttl', default_idempotency_key_ttl());
  spec.parent_run_id := option_id(o, 'parent_run_id', 'run');
  spec.parent_attempt_number := option_integer(o, 'parent_attempt_number', 1, 250);
  spec.resume_parent_on_completion := option_resume_parent(o, spec.parent_run_id);
  spec.delay_until := option_moment(o, 'delay', now());
  spec.ttl := option_duration(o, 'ttl', NULL);
  spec.max_duration := option_duration(o, 'max_duration', NULL);
  spec.queue := option_text(o, 'queue', 256);
  spec.concurrency_key := option_text(o, 'concurrency_key', 256);

  IF tags IS NOT NULL AND tags <> 'null'::jsonb THEN
    IF jsonb_typeof(tags) = 'string' THEN
      tags := jsonb_build_array(tags);
    END IF;
    IF jsonb_typeof(tags) <> 'array'
       OR EXISTS (SELECT FROM jsonb_array_elements(tags) AS t
                  WHERE jsonb_typeof(t) <> 'string' OR length(t #>> '{}') NOT BETWEEN 1 AND 128) THEN
      PERFORM raise_invalid('option tags', 'a string or an array of strings of 1 to 128 characters');
    END IF;
    IF jsonb_array_length(tags) > 10 THEN
      PERFORM raise_error('RO006', format('option tags has %s tags; the limit is 10', jsonb_array_length(tags)));
    END IF;
    SELECT array_agg(DISTINCT t ORDER BY t) INTO spec.tags FROM jsonb_array_elements_text(tags) AS t;
  END IF;
  spec.tags := coalesce(spec.tags, '{}');

  spec.max_attempts := coalesce(option_integer(o, 'max_attempts', 1, 250), default_max_attempts());
  spec.metadata := o -> 'metadata';
  IF spec.metadata IS NOT NULL AND jsonb_typeof(spec.metadata) NOT IN ('object', 'null') THEN
    PERFORM raise_invalid('option metadata', 'a JSON object');
  END IF;
  spec.metadata := coalesce(nullif(spec.metadata, 'null'::jsonb), '{}');
  PERFORM check_json_bounds(spec.metadata, 'option metadata');

  spec.run_id := option_id(o, 'run_id', 'run');
  spec.batch_id := option_id(o, 'batch_id', 'batch');
  spec.batch_index := option_integer(o, 'batch_index', 0, 2147483647);
  IF spec.batch_id IS NOT NULL AND spec.batch_index IS NULL THEN
    PERFORM raise_error('RO006', 'option batch_id needs batch_index');
  END IF;
  spec.dev_session_id := option_text(o, 'dev_session_id', 256);
  RETURN spec;
END
$$;

CREATE OR REPLACE FUNCTION runops.parse_batch_options(options jsonb,
  OUT idempotency_key text, OUT idempotency_key_ttl interval, OUT parent_run_id text,
  OUT resume_parent_on_completion boolean, OUT seal_timeout interval)
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
BEGIN
  PERFORM reject_unknown_options(o, ARRAY['idempotency_key', 'idempotency_key_ttl', 'parent_run_id',
                                          'resume_parent_on_completion', 'seal_timeout'], 'batch');
  idempotency_key := option_idempotency_key(o);
  idempotency_key_ttl := option_duration(o, 'idempotency_key_ttl', default_idempotency_key_ttl());
  parent_run_id := option_id(o, 'parent_run_id', 'run');
  resume_parent_on_completion := option_resume_parent(o, parent_run_id);
  seal_timeout := option_duration(o, 'seal_timeout', default_seal_timeout());
END
$$;

-- sql/functions/reads.sql
-- Read-through: a read answers from the store that owns the id — locally, or through the FDW —
-- and never refuses: a missing, foreign-tenant, malformed or unroutable id is simply no row.
-- Only an unreachable other store is an error (RO009).

-- Where a read of a bare id goes: its residency when this store holds it or the wired peer may
-- (a NEW id only once the split was ever enabled); NULL — no row, no one asked — for a malformed
-- id, an unwired peer, or a NEW id before any split. The one routing rule of get_run,
-- find_waitpoint and get_batch.
CREATE OR REPLACE FUNCTION runops.read_residency(bare text)
RETURNS text
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  residency text := try_classify_bare(bare);
BEGIN
  IF residency = local_residency() THEN
    RETURN residency;
  END IF;
  IF residency IS NULL OR NOT peer_wired() OR (residency = 'NEW' AND NOT (current_split_settings()).ever_enabled) THEN
    RETURN NULL;
  END IF;
  RETURN residency;
END
$$;

CREATE OR REPLACE FUNCTION runops.get_run(run_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text := bare_id(get_run.run_id, 'run');
  residency text := read_residency(bare);
  env_id text := get_run.environment_id;
BEGIN
  IF residency = local_residency() THEN
    RETURN QUERY SELECT * FROM run_view AS v
                 WHERE v.id = bare AND (env_id IS NULL OR v.environment_id = env_id);
    RETURN;
  ELSIF residency IS NULL THEN
    RETURN;
  END IF;
  BEGIN
    -- Two plain predicates, so postgres_fdw ships both and the remote uses its primary key.
    IF env_id IS NULL THEN
      RETURN QUERY SELECT * FROM runops_peer.run_view AS v WHERE v.id = bare;
    ELSE
      RETURN QUERY SELECT * FROM runops_peer.run_view AS v WHERE v.id = bare AND v.environment_id = env_id;
    END IF;
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', format('the %s store that owns %s is unavailable: %s',
                                        store_for_residency(residency), get_run.run_id, SQLERRM));
  END;
END
$$;

-- sql/functions/residency.sql
-- Residency: which store an id belongs to, a pure function of its shape (SPEC §2).
--
--   try_classify_residency / classify_residency  public: LEGACY, NEW, or NULL / RO001
--   local_residency        this store's residency (a constant rendered per store at install)
--   store_for_residency    LEGACY -> CONTROL_PLANE, NEW -> RUN_OPS
--   bare_id                a caller's id without its friendly prefix (NULL for another kind's)
--   friendly_ids           bare ids with their prefix, for a public function to return
--   try_classify_bare / classify_bare   the residency of a bare id
--   require_id             the id a write names: RO006 for a bad one, RO001 for no shape
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
    RAISE EXCEPTION 'unclassifiable id %: expected a 25-character cuid or a 27-character KSUID, optionally with a friendly prefix such as run_', pg_catalog.quote_nullable(id)
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
  END IF;
  RETURN bare;
END
$$;

-- sql/functions/retention.sql
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

-- sql/functions/run_rows.sql
-- The one run-row builder: what a new run's row holds, for every writer of new runs (the
-- root fast path of trigger_run, find_or_create_run, batch items). Writers insert its row as is:
--   INSERT INTO runs SELECT * FROM new_run(...)
-- A set-returning SQL function (one row), so PostgreSQL inlines it into the writer's INSERT and
-- folds what is constant there (a root without options costs no call at all); its row type is
-- the table's, so its columns cannot drift from the table's order. PostgreSQL inlines it only
-- when no argument is volatile (mint ids in a sub-select), and an argument is evaluated once per
-- use inside: pass columns, not expressions that parse or cast.
--
--   parent        the parent's row (NULL for a root): a child names it, a batch item its batch's
--   batch_id, batch_index  the batch index the run fills (a member through its own row)
--   spec          the parsed options (NULL: none); its key, parent and batch fields are not
--                 read: those are passed
--   status        the run's first status: PENDING, DELAYED or SYSTEM_FAILURE (a failed task)
--   key, key_hash the caller's key and its dedup key (NULL: the run holds none)
--   at            the caller's runops.now(), read once
CREATE OR REPLACE FUNCTION runops.new_run(id text, env runops.environment_context, parent runops.runs,
                                          batch_id text, batch_index integer,
                                          task_identifier text, payload jsonb, spec runops.trigger_spec,
                                          status text, error jsonb, key text, key_hash text,
                                          key_expires_at timestamptz, at timestamptz)
RETURNS SETOF runops.runs
LANGUAGE sql STABLE
AS $$
  SELECT id, env.id, env.project_id, env.organization_id, task_identifier, status,
         coalesce(payload, '{}'::jsonb), NULL::jsonb, error,
         coalesce(spec.metadata, '{}'::jsonb), coalesce(spec.tags, '{}'::text[]),
         coalesce(spec.queue, 'task/' || task_identifier), spec.concurrency_key,
         CASE WHEN key_hash IS NOT NULL THEN key END, key_hash,
         -- With no parent every scope acts as global, and says so.
         CASE WHEN key_hash IS NOT NULL THEN
           CASE WHEN parent.id IS NULL THEN 'global' ELSE coalesce(spec.idempotency_key_scope, 'run') END
         END,
         CASE WHEN key_hash IS NOT NULL THEN key_expires_at END,
         parent.id, spec.parent_attempt_number, coalesce(parent.root_run_id, parent.id),
         coalesce(parent.depth + 1, 0), coalesce(spec.resume_parent_on_completion, false),
         batch_id, batch_index, 0, coalesce(spec.max_attempts, runops.default_max_attempts()),
         CASE WHEN status = 'DELAYED' THEN spec.delay_until END, spec.ttl, spec.max_duration,
         spec.dev_session_id,
         NULL::text, NULL::interval, NULL::timestamptz, NULL::timestamptz,           -- no lease, no retry
         CASE WHEN status = 'PENDING' THEN at + spec.ttl END,                         -- ttl_expires_at
         NULL::timestamptz, NULL::text,                                               -- no deadline, not suspended
         CASE WHEN status = 'PENDING' THEN at END,                                    -- queued_at
         NULL::timestamptz,                                                           -- started_at
         CASE WHEN status = 'SYSTEM_FAILURE' THEN at END,                             -- completed_at
         NULL::timestamptz, at, at                                                    -- expired_at, created, updated
$$;

-- The options of a run that passed none (what parse_trigger_options answers for '{}'), as a
-- constant the planner folds into new_run.
CREATE OR REPLACE FUNCTION runops.no_options()
RETURNS runops.trigger_spec
LANGUAGE sql IMMUTABLE
AS $$
  SELECT ROW(NULL, 'run', runops.default_idempotency_key_ttl(), NULL, NULL, false, NULL, NULL, NULL, NULL, NULL,
             '{}'::text[], runops.default_max_attempts(), '{}'::jsonb, NULL, NULL, NULL, NULL)::runops.trigger_spec
$$;

-- sql/functions/split.sql
-- Split control and residency decisions.
--
-- split_settings lives on the control plane and reaches run-ops through the mirror. A root run's
-- residency follows it (rule 3); children, batches and items follow their anchor (rule 2); a
-- pre-minted id must agree with both (rule 1).

-- Helpers that query are PL/pgSQL, not SQL: a non-inlinable SQL function called from PL/pgSQL
-- is parsed and planned again in every transaction, while PL/pgSQL keeps its plans.
CREATE OR REPLACE FUNCTION runops.peer_wired()
RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  RETURN EXISTS (SELECT FROM pg_catalog.pg_foreign_server AS s WHERE s.srvname = 'runops_peer');
END
$$;

-- The settings row; a run-ops store whose mirror has not synced yet reads "never enabled".
CREATE OR REPLACE FUNCTION runops.current_split_settings()
RETURNS runops.split_settings
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  s split_settings;
BEGIN
  SELECT * INTO s FROM split_settings;
  IF NOT FOUND THEN
    s := ROW(true, false, false, 'cuid', NULL, NULL);
  END IF;
  RETURN s;
END
$$;

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

-- sql/functions/store_identity.sql
-- Which store this is (SPEC §4, identity functions): store_role and store_identity, plain
-- functions (no SECURITY DEFINER) that read nothing a caller may not see.

CREATE OR REPLACE FUNCTION runops.store_role()
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
  SELECT c.store_role FROM runops.store_config AS c
$$;

CREATE OR REPLACE FUNCTION runops.store_identity(
  OUT system_identifier text, OUT database_name text, OUT database_oid bigint,
  OUT store_role text, OUT server_version text)
RETURNS SETOF record
LANGUAGE sql STABLE
AS $$
  SELECT (pg_catalog.pg_control_system()).system_identifier::text,
         pg_catalog.current_database()::text,
         d.oid::bigint,
         runops.store_role(),
         pg_catalog.current_setting('server_version')
  FROM pg_catalog.pg_database AS d
  WHERE d.datname = pg_catalog.current_database()
$$;

-- sql/functions/tenants.sql
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
BEGIN
  PERFORM reject_unknown_options(c, ARRAY['paused', 'archived', 'maximum_concurrency_limit', 'notifications'],
                                 'environment change');
  -- Parse every value before writing anything.
  PERFORM option_boolean(c, 'paused'), option_boolean(c, 'archived'), option_boolean(c, 'notifications'),
          option_integer(c, 'maximum_concurrency_limit', 0, 100000);
  PERFORM require_control_plane('update_environment');
  UPDATE runtime_environments AS e
  SET paused = coalesce(option_boolean(c, 'paused'), e.paused),
      archived = coalesce(option_boolean(c, 'archived'), e.archived),
      notifications = coalesce(option_boolean(c, 'notifications'), e.notifications),
      maximum_concurrency_limit = coalesce(option_integer(c, 'maximum_concurrency_limit', 0, 100000),
                                           e.maximum_concurrency_limit),
      updated_at = now()
  WHERE e.id = update_environment.environment_id;
  IF NOT FOUND THEN
    PERFORM raise_error('RO004', format('environment %s not found', input_prefix(update_environment.environment_id)));
  END IF;
END
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
  fresh boolean;
  stale text;
BEGIN
  -- The mirror's freshness comes with the same query (on the control plane, where it means
  -- nothing, it costs a two-row index scan): a separate call cost every run-ops admission 30 µs.
  SELECT e.id, e.project_id, e.organization_id, e.type, e.paused, e.archived,
         p.deleted_at IS NOT NULL, o.runs_enabled, o.mint_kind, e.maximum_concurrency_limit,
         e.notifications, coalesce(st.enabled, false), coalesce(st.ever_enabled, false),
         coalesce(st.default_mint_kind, 'cuid'), mirror_within_bound(hb.fed_at, hb.bound_seconds)
  INTO ctx.id, ctx.project_id, ctx.organization_id, ctx.type, ctx.paused, ctx.archived,
       ctx.project_deleted, ctx.runs_enabled, ctx.mint_kind, ctx.maximum_concurrency_limit,
       ctx.notifications, ctx.split_enabled, ctx.split_ever_enabled, ctx.default_mint_kind, fresh
  FROM mirror_feed() AS hb
  LEFT JOIN split_settings AS st ON true
  LEFT JOIN runtime_environments AS e ON e.id = load_environment.environment_id
  LEFT JOIN projects AS p ON p.id = e.project_id
  LEFT JOIN organizations AS o ON o.id = e.organization_id;
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
    END IF;
    SELECT e.id, e.project_id, e.organization_id, e.type, e.paused, e.archived,
           p.deleted_at IS NOT NULL, o.runs_enabled, o.mint_kind, e.maximum_concurrency_limit,
           e.notifications, s.enabled, s.ever_enabled, s.default_mint_kind
    INTO ctx
    FROM runops_peer.runtime_environments AS e
    JOIN runops_peer.projects AS p ON p.id = e.project_id
    JOIN runops_peer.organizations AS o ON o.id = e.organization_id
    WHERE e.id = load_environment.environment_id;
  EXCEPTION WHEN connection_exception THEN
    IF stale IS NOT NULL THEN
      PERFORM raise_error('RO009', 'the tenant mirror on this run-ops store is ' || stale
                                   || ', and the control-plane store is unavailable to refresh it',
                          NULL, 'new work resumes when replication or tick''s pull brings the mirror up to date');
    END IF;
    PERFORM raise_error('RO009', 'the control-plane store is unavailable, and environment '
                                 || input_prefix(load_environment.environment_id) || ' is not in the local mirror yet');
  END;
  IF ctx.id IS NULL THEN
    ctx.split_enabled := coalesce(s.enabled, false);
    ctx.split_ever_enabled := coalesce(s.ever_enabled, false);
    ctx.default_mint_kind := coalesce(s.default_mint_kind, 'cuid');
  END IF;
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

-- When the mirror was last fed — the newer of the control plane's tick as replication delivered
-- it and this store's last pull (NULL: never) — and the store's freshness bound, as one row.
-- Set-returning SQL, so the hot paths (load_environment, root_admission) inline it into their
-- own query instead of calling it.
CREATE OR REPLACE FUNCTION runops.mirror_feed()
RETURNS TABLE (fed_at timestamptz, bound_seconds integer)
LANGUAGE sql STABLE
AS $$
  SELECT hb.fed_at, c.mirror_freshness_seconds
  FROM runops.store_config AS c
  CROSS JOIN LATERAL (SELECT max(b.beat_at) AS fed_at FROM runops.heartbeats AS b
                      WHERE b.source IN ('control_plane_tick', 'mirror_pull')) AS hb
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
-- age_seconds is from the newer mirror heartbeat; fresh says whether new work may rest on it.
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
  RETURN jsonb_build_object(
    'engine', engine,
    'state', state,
    'subscription_enabled', sub.enabled,
    'worker_running', sub.running,
    'control_plane_tick_at', cp_tick,
    'pulled_at', pulled,
    'age_seconds', round(extract(epoch FROM pg_catalog.now() - greatest(cp_tick, pulled))::numeric, 3),
    'bound_seconds', bound,
    'fresh', mirror_stale() IS NULL);
END
$$;

-- RO004 when the environment does not exist, RO005 when it may not take new work.
CREATE OR REPLACE FUNCTION runops.require_usable(ctx runops.environment_context, environment_id text)
RETURNS runops.environment_context
LANGUAGE plpgsql STABLE
AS $$
BEGIN
  IF ctx.id IS NULL THEN
    PERFORM raise_error('RO004', format('environment %s not found', quote_nullable(input_prefix(environment_id))));
  END IF;
  IF ctx.archived OR ctx.paused OR ctx.project_deleted OR NOT ctx.runs_enabled THEN
    PERFORM raise_error('RO005',
      format('environment %s cannot take new work: it is %s', ctx.id,
             CASE WHEN ctx.archived THEN 'archived' WHEN ctx.paused THEN 'paused'
                  WHEN ctx.project_deleted THEN 'in a deleted project'
                  ELSE 'in an organization whose runs are disabled' END),
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
      updated_at = p.updated_at
    FROM runops_peer.runtime_environments AS p WHERE p.id = o.id AND o.updated_at IS DISTINCT FROM p.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    UPDATE split_settings AS o SET enabled = p.enabled, ever_enabled = p.ever_enabled,
      default_mint_kind = p.default_mint_kind, updated_at = p.updated_at,
      claims_backfilled_at = p.claims_backfilled_at
    FROM runops_peer.split_settings AS p WHERE o.updated_at IS DISTINCT FROM p.updated_at;
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
      updated_at = excluded.updated_at
    WHERE runtime_environments.updated_at IS DISTINCT FROM excluded.updated_at;
    GET DIAGNOSTICS k = ROW_COUNT; n := n + k;
    INSERT INTO split_settings SELECT * FROM runops_peer.split_settings
    ON CONFLICT (singleton) DO UPDATE SET enabled = excluded.enabled, ever_enabled = excluded.ever_enabled,
      default_mint_kind = excluded.default_mint_kind, updated_at = excluded.updated_at,
      claims_backfilled_at = excluded.claims_backfilled_at
    WHERE split_settings.updated_at IS DISTINCT FROM excluded.updated_at;
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

-- sql/functions/tick.sql
-- tick: the time-driven steps of one store. Every time comparison reads runops.now() in this store.
-- Each step claims its rows with FOR UPDATE SKIP LOCKED, so ticks running at once on one store
-- never process a row twice: a row another tick holds is simply left to it.

-- A run whose timer has come goes to PENDING: a DELAYED one at delay_until, its TTL clock starting
-- now; a RETRYING_AFTER_FAILURE one at retry_at, to the back of the queue. One step, from_status,
-- a call (enqueue_delayed_runs, requeue_retries), each its own mover and its own max_runs.
-- from_status is a parameter, so a generic plan cannot prove runs_timer_idx's predicate from it:
-- the constant IN list does, and the plan stays the index scan in wake_at order it was with the
-- status spelled out (the status was a filter on that scan either way).
CREATE OR REPLACE FUNCTION runops.wake_due_runs(from_status text, max_runs integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  n integer;
BEGIN
  PERFORM set_mover(CASE from_status WHEN 'DELAYED' THEN 'enqueue_delayed_runs' ELSE 'requeue_retries' END);
  WITH due AS (
    SELECT r.id FROM runs AS r
    WHERE r.status IN ('DELAYED', 'RETRYING_AFTER_FAILURE') AND r.status = from_status
      AND wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) <= ts
    ORDER BY wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) LIMIT max_runs FOR UPDATE SKIP LOCKED
  )
  UPDATE runs AS r
  SET status = 'PENDING', queued_at = ts, updated_at = ts,
      ttl_expires_at = CASE r.status WHEN 'DELAYED' THEN ts + r.ttl ELSE r.ttl_expires_at END,
      retry_at = CASE r.status WHEN 'RETRYING_AFTER_FAILURE' THEN NULL ELSE r.retry_at END
  FROM due WHERE r.id = due.id;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- DELAYED -> PENDING once delay_until has come; the TTL clock starts now.
CREATE OR REPLACE FUNCTION runops.enqueue_delayed_runs(max_runs integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
BEGIN
  PERFORM require_between(max_runs, 1, 100000, 'max_runs');
  RETURN wake_due_runs('DELAYED', max_runs);
END
$$;

-- PENDING runs never locked by a worker, whose TTL has run out (now >= queued_at + ttl), become
-- EXPIRED; their key is released and their RUN waitpoint completes with the error.
CREATE OR REPLACE FUNCTION runops.expire_enqueued_runs(max_runs integer DEFAULT 1000)
RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  ts timestamptz := now();
  expired text[];
  keyed text[];
BEGIN
  PERFORM require_between(max_runs, 1, 100000, 'max_runs');
  PERFORM set_mover('expire_enqueued_runs');
  WITH due AS (
    SELECT r.id FROM runs AS r
    WHERE r.status = 'PENDING' AND r.ttl_expires_at IS NOT NULL AND r.started_at IS NULL
      AND wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) <= ts
    ORDER BY wake_at(r.status, r.delay_until, r.retry_at, r.ttl_expires_at) LIMIT max_runs FOR UPDATE SKIP LOCKED
  ), moved AS (
    UPDATE runs AS r
    SET status = 'EXPIRED', expired_at = ts, completed_at = ts, ttl_expires_at = NULL, updated_at = ts,
        error = jsonb_build_object('message', format('run expired because its TTL (%s) was reached', duration_text(r.ttl)),
                                   'status', 'EXPIRED')
    FROM due WHERE r.id = due.id
    RETURNING r.id, r.idempotency_key_hash
  )
  SELECT coalesce(array_agg(m.id), '{}'), array_agg(m.id) FILTER (WHERE m.idempotency_key_hash IS NOT NULL)
  INTO expired, keyed FROM moved AS m;
  -- EXPIRED releases its key (run_statuses): dedup would ignore it anyway, but an expired run is
  -- let go of at once, so reads show no key on it.
  IF keyed IS NOT NULL THEN
    PERFORM release_idempotency_keys(keyed, NULL);
  END IF;
  RETURN cardinality(expired);
END
$$;

-- A worker that stopped heartbeating loses its run: back to PENDING for another worker (its
-- attempt is failed; the next start_attempt counts towards max_attempts). No run stays
-- DEQUEUED or EXECUTING forever.
CREATE OR REPLACE FUNCTION runops.release_lapsed_leases(max_runs integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  released text[];
BEGIN
  PERFORM set_mover('release_lapsed_leases');
  WITH due AS (
    SELECT r.id FROM runs AS r
    WHERE r.status IN ('DEQUEUED', 'EXECUTING') AND r.lease_expires_at <= ts
    ORDER BY r.lease_expires_at LIMIT max_runs FOR UPDATE SKIP LOCKED
  ), moved AS (
    UPDATE runs AS r
    SET status = 'PENDING', locked_by = NULL, lease_expires_at = NULL, execution_deadline = NULL, updated_at = ts
    FROM due WHERE r.id = due.id
    RETURNING r.id
  )
  SELECT coalesce(array_agg(m.id), '{}') INTO released FROM moved AS m;
  UPDATE attempts AS a
  SET status = 'FAILED', completed_at = ts,
      error = jsonb_build_object('message', 'the worker''s lease lapsed (no heartbeat)')
  WHERE a.run_id = ANY (released) AND a.status = 'EXECUTING';
  RETURN cardinality(released);
END
$$;

-- RETRYING_AFTER_FAILURE -> PENDING at retry_at (to the back of the queue).
CREATE OR REPLACE FUNCTION runops.requeue_retries(max_runs integer)
RETURNS integer
LANGUAGE sql VOLATILE
AS $$
  SELECT wake_due_runs('RETRYING_AFTER_FAILURE', max_runs)
$$;

-- EXECUTING past attempt start + max_duration -> TIMED_OUT.
CREATE OR REPLACE FUNCTION runops.enforce_max_duration(max_runs integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  n integer;
BEGIN
  PERFORM set_mover('enforce_max_duration');
  WITH due AS (
    SELECT r.id FROM runs AS r
    WHERE r.status = 'EXECUTING' AND r.execution_deadline <= ts
    ORDER BY r.execution_deadline LIMIT max_runs FOR UPDATE SKIP LOCKED
  )
  UPDATE runs AS r
  SET status = 'TIMED_OUT', completed_at = ts, locked_by = NULL, lease_expires_at = NULL,
      execution_deadline = NULL, updated_at = ts,
      error = jsonb_build_object('message', format('run exceeded its max_duration (%s)', duration_text(r.max_duration)),
                                 'status', 'TIMED_OUT')
  FROM due WHERE r.id = due.id;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- Due DATETIME waitpoints complete; MANUAL ones past their timeout complete with an error.
-- Either way their local edges complete and the runs they were the last blocker of resume.
CREATE OR REPLACE FUNCTION runops.complete_due_waitpoints(max_rows integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  w record;
  due text[];
  datetimes integer := 0;
  timeouts integer := 0;
BEGIN
  SELECT array_agg(x.id ORDER BY x.id) INTO due FROM (
    SELECT x.id FROM waitpoints AS x
    WHERE x.status = 'PENDING' AND ((x.type = 'DATETIME' AND x.completed_after <= ts) OR x.timeout_at <= ts)
    ORDER BY x.id LIMIT max_rows FOR UPDATE SKIP LOCKED) AS x;
  IF due IS NULL THEN
    RETURN jsonb_build_object('datetime_waitpoints', 0, 'manual_timeouts', 0);
  END IF;
  -- Lock every run these waitpoints unblock in one id order, before completing any: two ticks
  -- completing different waitpoints of the same runs would otherwise lock them crosswise.
  PERFORM FROM runs AS r
  WHERE r.id IN (SELECT e.run_id FROM run_waitpoints AS e WHERE e.waitpoint_id = ANY (due) AND e.completed_at IS NULL)
  ORDER BY r.id FOR UPDATE;
  FOR w IN SELECT x.id, x.type FROM waitpoints AS x WHERE x.id = ANY (due) ORDER BY x.id
  LOOP
    UPDATE waitpoints AS x
    SET status = 'COMPLETED', completed_at = ts,
        output_is_error = (w.type = 'MANUAL'),
        output = CASE WHEN w.type = 'MANUAL'
                      THEN jsonb_build_object('message', 'waitpoint timed out') END
    WHERE x.id = w.id;
    PERFORM resume_local_waiters(w.id);
    IF w.type = 'DATETIME' THEN datetimes := datetimes + 1; ELSE timeouts := timeouts + 1; END IF;
  END LOOP;
  RETURN jsonb_build_object('datetime_waitpoints', datetimes, 'manual_timeouts', timeouts);
END
$$;

-- WAIT_FOR_* runs whose blockers are all done — including blockers in the other store, read
-- through the FDW — resume. Local completions resume runs at once; this catches the rest (and
-- anything a crash left behind).
CREATE OR REPLACE FUNCTION runops.resume_waiting_runs(max_runs integer)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  candidate text;
  resumed integer := 0;
BEGIN
  FOR candidate IN
    SELECT r.id FROM runs AS r
    WHERE r.status = 'WAITING_TO_RESUME' AND r.suspended_reason IS DISTINCT FROM 'MANUAL'
      AND (NOT EXISTS (SELECT FROM run_waitpoints AS e WHERE e.run_id = r.id AND e.completed_at IS NULL)
           OR EXISTS (SELECT FROM run_waitpoints AS e WHERE e.run_id = r.id AND e.completed_at IS NULL
                      AND try_classify_residency(e.waitpoint_id) <> local_residency()))
    ORDER BY r.updated_at LIMIT max_runs FOR UPDATE SKIP LOCKED
  LOOP
    BEGIN
      PERFORM refresh_blockers(candidate, true);
    EXCEPTION WHEN SQLSTATE 'RO009' THEN
      CONTINUE;  -- the other store is down: try again on the next tick
    END;
    IF resume_if_unblocked(candidate, false) THEN
      resumed := resumed + 1;
    ELSE
      -- Still blocked: to the back of the line, so the next tick looks at others first.
      UPDATE runs AS r SET updated_at = now() WHERE r.id = candidate;
    END IF;
  END LOOP;
  RETURN resumed;
END
$$;

-- The mirror pull as a tick step, on the run-ops store: every tick under the pull engine; under
-- logical replication only once the mirror is 10 s old, or a third of the freshness bound if
-- that is less (replication is not applying, or the control plane's tick is not running), so
-- the pull has refreshed it well before the bound turns new work away. An unreachable
-- control plane must not roll back the rest of the tick's work (-1 says it failed; the next
-- tick tries again).
CREATE OR REPLACE FUNCTION runops.pull_mirror_for_tick()
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  IF local_residency() <> 'NEW' THEN
    RETURN 0;
  END IF;
  IF mirror_subscribed()
     AND mirror_fed_at() > pg_catalog.now() - pg_catalog.make_interval(
           secs => (SELECT least(10, c.mirror_freshness_seconds / 3.0) FROM store_config AS c)) THEN
    RETURN 0;
  END IF;
  RETURN pull_tenant_mirror();
EXCEPTION WHEN connection_exception THEN
  RETURN -1;
END
$$;

-- One pass of all time-driven work in this store. Safe to run from many processes at once.
CREATE OR REPLACE FUNCTION runops.tick(max_rows integer DEFAULT 1000)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  n integer := require_between(max_rows, 1, 100000, 'max_rows');
  counts jsonb;
BEGIN
  counts := jsonb_build_object(
    'delayed', enqueue_delayed_runs(n),
    'retried', requeue_retries(n),
    'expired', expire_enqueued_runs(n),
    'timed_out', enforce_max_duration(n),
    'leases_released', release_lapsed_leases(n));
  counts := counts || complete_due_waitpoints(n)
            || jsonb_build_object('batches_aborted', abort_unsealed_batches(n),
                                  'batches_finished_remote', finish_remote_batches(n));
  counts := counts || jsonb_build_object('resumed', resume_waiting_runs(n), 'mirror', pull_mirror_for_tick());
  IF local_residency() = 'NEW' THEN
    counts := counts || jsonb_build_object('claims_pruned', prune_claims(n));
    PERFORM beat('run_ops_tick');
  ELSE
    -- Replication carries this row to the run-ops store: the tenant mirror's heartbeat.
    PERFORM beat('control_plane_tick');
  END IF;
  PERFORM set_mover('');
  RETURN counts;
END
$$;

-- For installations that schedule tick inside PostgreSQL with pg_cron (whose Debian build, 1.4,
-- schedules by the minute): a job started every minute ticks every few seconds until the
-- minute is over, committing after each pass so a tick's work is visible at once.
--   SELECT cron.schedule('runops-tick', '* * * * *', 'CALL runops.tick_every(55, 2)');
-- A procedure that commits may not be SECURITY DEFINER or carry SET; it only calls tick().
-- At most 300 s a call (a scheduler's minute fits; no caller pins a backend for longer), and
-- only outside a transaction block, where its COMMIT would fail after the first pass: there,
-- the transaction began before this statement, so now() (the transaction's start) is earlier
-- than statement_timestamp(); a statement that starts its own transaction sees them equal.
CREATE OR REPLACE PROCEDURE runops.tick_every(for_seconds integer, every_seconds integer DEFAULT 2,
                                              max_rows integer DEFAULT 1000)
LANGUAGE plpgsql
AS $$
DECLARE
  stop_at timestamptz := pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => for_seconds);
BEGIN
  IF for_seconds IS NULL OR for_seconds NOT BETWEEN 1 AND 300 OR every_seconds IS NULL
     OR every_seconds NOT BETWEEN 1 AND for_seconds THEN
    RAISE EXCEPTION 'tick_every needs 1 to 300 seconds and an interval of 1 s up to that'
      USING ERRCODE = 'RO006';
  END IF;
  IF pg_catalog.now() <> pg_catalog.statement_timestamp() THEN
    RAISE EXCEPTION 'tick_every commits after each pass: CALL it on its own, outside a transaction block'
      USING ERRCODE = 'RO006', HINT = 'use autocommit, or call runops.tick() inside your transaction';
  END IF;
  LOOP
    PERFORM runops.tick(max_rows);
    COMMIT;
    EXIT WHEN pg_catalog.clock_timestamp() + pg_catalog.make_interval(secs => every_seconds) > stop_at;
    PERFORM pg_catalog.pg_sleep(every_seconds::double precision);
  END LOOP;
END
$$;

-- sql/functions/trigger_run.sql
-- Triggering runs (SPEC §4): trigger_run and trigger_failed_task.
--
-- trigger_run = validate_new_run (RO006, bounded_input.sql) -> load_environment (one query, with
--   the split settings) -> decide_residency (RO001, RO006, RO002) -> require_parent (RO004, RO003)
--   -> require_usable (RO004, RO005) -> find_or_create_run (idempotency.sql).
-- trigger_failed_task takes the same path (admit_new_run) to a run born SYSTEM_FAILURE.

-- The parent a child names, in this store and this environment (RO004).
CREATE OR REPLACE FUNCTION runops.require_parent(spec runops.trigger_spec, environment_id text)
RETURNS runops.runs
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  parent runs;
BEGIN
  SELECT * INTO parent FROM runs AS r WHERE r.id = spec.parent_run_id;
  IF NOT FOUND OR parent.environment_id <> require_parent.environment_id THEN
    PERFORM raise_error('RO004', format('parent run run_%s not found in environment %s', spec.parent_run_id,
                                        require_parent.environment_id));
  END IF;
  RETURN parent;
END
$$;

-- A parent that is to wait for its child must be live (RO003, the last check of all).
CREATE OR REPLACE FUNCTION runops.require_waitable_parent(parent runops.runs, waits boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF waits AND parent.id IS NOT NULL AND is_final_status(parent.status) THEN
    PERFORM raise_error('RO003', format('parent run run_%s is %s: a final run cannot wait for a child',
                                        parent.id, parent.status));
  END IF;
END
$$;

-- Trigger-and-wait: the parent waits on the child's RUN waitpoint (the child's id). Parent and
-- child are always in one store (children inherit residency), so the edge is local; it is born
-- done when the child already finished, so the parent never hangs on a cached final run.
CREATE OR REPLACE FUNCTION runops.wait_for_child(spec runops.trigger_spec, parent runops.runs, child_id text,
                                                 child_status text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  IF spec.resume_parent_on_completion AND parent.id IS NOT NULL THEN
    PERFORM add_blocker(parent.id, parent.environment_id, child_id, is_final_status(child_status));
    IF is_final_status(child_status) THEN
      PERFORM resume_if_unblocked(parent.id, false);  -- a parent already suspended goes on at once
    END IF;
  END IF;
END
$$;

-- The one admission of a single run, for trigger_run and trigger_failed_task: every check in
-- the SPEC's order, then the batch index it fills (a re-sent index returns its run), then
-- find_or_create_run. initial_status NULL lets find_or_create_run choose PENDING or DELAYED. The
-- run's id comes back bare.
CREATE OR REPLACE FUNCTION runops.admit_new_run(environment_id text, task_identifier text, payload jsonb,
                                                options jsonb, initial_status text, error jsonb,
                                                OUT run_id text, OUT is_cached boolean, OUT status text,
                                                OUT residency text)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  spec trigger_spec;
  env_id text := admit_new_run.environment_id;
  task text := admit_new_run.task_identifier;
  owner_residency text;
  env environment_context;
  parent runs;
  target batches;
  created record;
  existing text;
BEGIN
  spec := validate_new_run(env_id, task, admit_new_run.payload, admit_new_run.options);
  IF admit_new_run.error IS NOT NULL THEN
    PERFORM check_json_bounds(admit_new_run.error, 'error');
  END IF;
  env := load_environment(env_id);
  owner_residency := decide_residency(env, env_id, spec);
  IF owner_residency <> local_residency() THEN
    PERFORM raise_wrong_store('a new run of environment', env_id, store_for_residency(owner_residency));
  END IF;
  IF spec.parent_run_id IS NOT NULL THEN
    parent := require_parent(spec, env_id);
  END IF;
  IF spec.batch_id IS NOT NULL THEN
    target := lock_batch_for_index(spec, env_id);
  END IF;
  -- Admitted like any other run (SPEC §3 [1.2]): an environment that takes no new work is RO005.
  env := require_usable(env, env_id);
  PERFORM require_waitable_parent(parent, spec.resume_parent_on_completion);
  IF spec.batch_id IS NOT NULL THEN
    existing := claim_batch_index(target, spec);
    IF existing IS NOT NULL THEN
      SELECT r.id, true, r.status, local_residency() INTO run_id, is_cached, status, residency
      FROM runs AS r WHERE r.id = existing;
      RETURN;
    END IF;
  END IF;
  created := find_or_create_run(env, parent, task, admit_new_run.payload, spec, initial_status,
                                admit_new_run.error);
  IF spec.batch_id IS NOT NULL THEN
    PERFORM attach_batch_item(spec.batch_id, spec.batch_index, created.run_id);
  END IF;
  run_id := created.run_id;
  is_cached := created.is_cached;
  status := created.status;
  residency := created.residency;  -- a cached holder may live in the other store
END
$$;

-- The environment a root run without anchors is admitted into, when every check of admit_new_run
-- passes: a valid task identifier and a payload within the smallest limits (validate_new_run;
-- options are the caller's to check), the environment found in a fresh mirror
-- (load_environment's rule), usable (require_usable), its roots living in this store
-- (decide_residency). No row when any check fails: the caller then takes admit_new_run, which
-- names the failure. Inlined SQL, so it costs no call of its own.
CREATE OR REPLACE FUNCTION runops.root_admission(environment_id text, task_identifier text, payload jsonb)
RETURNS SETOF runops.environment_context
LANGUAGE sql STABLE
AS $$
  SELECT (x.ctx).*
  FROM runops.runtime_environments AS e
  JOIN runops.projects AS p ON p.id = e.project_id
  JOIN runops.organizations AS o ON o.id = e.organization_id
  CROSS JOIN runops.split_settings AS st
  CROSS JOIN LATERAL (SELECT ROW(e.id, e.project_id, e.organization_id, e.type, e.paused, e.archived,
                                 p.deleted_at IS NOT NULL, o.runs_enabled, o.mint_kind,
                                 e.maximum_concurrency_limit, e.notifications, st.enabled, st.ever_enabled,
                                 st.default_mint_kind)::runops.environment_context AS ctx) AS x
  WHERE e.id = root_admission.environment_id
    AND runops.task_identifier_is_valid(root_admission.task_identifier)
    AND (root_admission.payload IS NULL OR runops.payload_within_smallest_limits(root_admission.payload))
    AND NOT e.archived AND NOT e.paused AND p.deleted_at IS NULL AND o.runs_enabled
    AND runops.root_residency(x.ctx) = runops.local_residency()
    AND (runops.local_residency() = 'LEGACY'
         OR EXISTS (SELECT FROM runops.mirror_feed() AS f WHERE runops.mirror_within_bound(f.fed_at, f.bound_seconds)))
$$;

CREATE OR REPLACE FUNCTION runops.trigger_run(environment_id text, task_identifier text,
                                              payload jsonb DEFAULT '{}', options jsonb DEFAULT '{}')
RETURNS TABLE (run_id text, is_cached boolean, status text, residency text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  admitted record;
  ts timestamptz;
  spec trigger_spec;
  env environment_context;
BEGIN
  -- The common calls, a root run without options or with only a key, skip admit_new_run's chain
  -- of checks: root_admission holds every one of them that can pass without an error, as
  -- predicates of one query. On any miss nothing was written and the full path below raises the
  -- error in the SPEC's order. Without a key the run is one statement; a fresh id conflicts with
  -- nothing, so a plain INSERT (ON CONFLICT costs a speculative-insert WAL record per run).
  IF trigger_run.options = '{}'::jsonb THEN
    ts := now();
    INSERT INTO runs
    SELECT n.*
    FROM root_admission(trigger_run.environment_id, trigger_run.task_identifier, trigger_run.payload)
           AS admitted_env
    -- The id is minted in a sub-select of its own: a volatile argument would stop PostgreSQL
    -- inlining new_run (it would run as a function call per run).
    CROSS JOIN LATERAL (SELECT CASE WHEN local_residency() = 'NEW' THEN next_ksuid() ELSE generate_cuid() END
                        AS id) AS minted
    CROSS JOIN LATERAL new_run(minted.id, admitted_env, NULL, NULL, NULL, trigger_run.task_identifier,
                               trigger_run.payload, no_options(), 'PENDING', NULL, NULL, NULL, NULL, ts) AS n
    RETURNING 'run_' || runs.id, false, runs.status, local_residency()
    INTO run_id, is_cached, status, residency;
    IF FOUND THEN
      RETURN NEXT;
      RETURN;
    END IF;
  ELSIF only_a_valid_key(trigger_run.options) THEN
    -- A root with only a key: the same checks in one query, then the idempotency engine.
    spec := no_options();
    spec.idempotency_key := trigger_run.options ->> 'idempotency_key';
    SELECT * INTO env
    FROM root_admission(trigger_run.environment_id, trigger_run.task_identifier, trigger_run.payload);
  END IF;
  IF env.id IS NOT NULL THEN  -- a root with only a key, admitted just above
    admitted := find_or_create_run(env, NULL, trigger_run.task_identifier, trigger_run.payload, spec, NULL, NULL);
  ELSE
    admitted := admit_new_run(trigger_run.environment_id, trigger_run.task_identifier, trigger_run.payload,
                              trigger_run.options, NULL, NULL);
  END IF;
  run_id := 'run_' || admitted.run_id;
  is_cached := admitted.is_cached;
  status := admitted.status;
  residency := admitted.residency;
  RETURN NEXT;  -- cheaper than RETURN QUERY, which runs a query into a tuplestore
END
$$;

-- A run that could not be triggered (a bad batch item, a deploy that failed): born
-- SYSTEM_FAILURE, so a batch still counts it and a waiting parent resumes with its error.
CREATE OR REPLACE FUNCTION runops.trigger_failed_task(environment_id text, task_identifier text, payload jsonb,
                                                      error jsonb, options jsonb DEFAULT '{}')
RETURNS TABLE (run_id text, is_cached boolean, status text, residency text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  admitted record := admit_new_run(trigger_failed_task.environment_id, trigger_failed_task.task_identifier,
                                   coalesce(trigger_failed_task.payload, '{}'), trigger_failed_task.options,
                                   'SYSTEM_FAILURE',
                                   coalesce(trigger_failed_task.error,
                                            '{"message": "the task could not be triggered"}'));
BEGIN
  run_id := 'run_' || admitted.run_id;
  is_cached := admitted.is_cached;
  status := admitted.status;
  residency := admitted.residency;
  RETURN NEXT;
END
$$;

-- sql/functions/waitpoints.sql
-- Waitpoints: what a run can wait on, and the edges that say it does.
--
-- Edges (run_waitpoints) live with the blocked run; the waitpoint may live in either store.
-- A local completion completes local edges and resumes their runs in the same transaction;
-- edges in the other store are reported back (remote_run_ids) so the client can send resume_run
-- there, and tick there re-checks any it missed by reading this store through the FDW.
-- block_run and complete_waitpoint take the optional environment guard (RO004 for another
-- environment's row); a completion's output passes check_json_bounds.

-- The waitpoint named by a bare id, from the store its shape names. 0 rows when it does not
-- exist (or lives in a store that is not wired). RO009 when that store is unreachable.
CREATE OR REPLACE FUNCTION runops.find_waitpoint(waitpoint_id text)
RETURNS SETOF runops.waitpoint_view
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  residency text := read_residency(waitpoint_id);
BEGIN
  IF residency = local_residency() THEN
    RETURN QUERY SELECT * FROM waitpoint_view AS w WHERE w.id = find_waitpoint.waitpoint_id;
    RETURN;
  ELSIF residency IS NULL THEN
    RETURN;
  END IF;
  BEGIN
    RETURN QUERY SELECT * FROM runops_peer.waitpoint_view AS w WHERE w.id = find_waitpoint.waitpoint_id;
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', format('the %s store that owns waitpoint_%s is unavailable: %s',
                                        store_for_residency(residency), waitpoint_id, SQLERRM));
  END;
END
$$;

-- Whether a waitpoint row counts as done at time ts (a DATETIME waitpoint is done once due,
-- even before tick has marked it).
CREATE OR REPLACE FUNCTION runops.waitpoint_done(status text, type text, completed_after timestamptz, ts timestamptz)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT status = 'COMPLETED' OR (type = 'DATETIME' AND completed_after <= ts)
$$;

-- Completes the pending local edges on a waitpoint and resumes the runs it was the last
-- blocker of. Returns the (bare) ids of the runs nothing blocks any more.
CREATE OR REPLACE FUNCTION runops.resume_local_waiters(waitpoint_id text)
RETURNS text[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  blocked text;
  unblocked text[] := '{}'::text[];
BEGIN
  -- Lock the blocked runs in id order, so two completions never deadlock on each other.
  FOR blocked IN
    SELECT e.run_id FROM run_waitpoints AS e
    WHERE e.waitpoint_id = resume_local_waiters.waitpoint_id AND e.completed_at IS NULL
    ORDER BY e.run_id
  LOOP
    UPDATE run_waitpoints AS e SET completed_at = now()
    WHERE e.run_id = blocked AND e.waitpoint_id = resume_local_waiters.waitpoint_id AND e.completed_at IS NULL;
    IF resume_if_unblocked(blocked, false) THEN
      unblocked := unblocked || blocked;
    END IF;
  END LOOP;
  RETURN unblocked;
END
$$;

-- Marks the run's pending edges whose waitpoints are done: local ones always, the other
-- store's through the FDW when include_remote. Returns how many edges it completed.
CREATE OR REPLACE FUNCTION runops.refresh_blockers(run_id text, include_remote boolean)
RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  ts timestamptz := now();
  n integer;
  k integer;
  remote text[];
  done text[];
BEGIN
  UPDATE run_waitpoints AS e SET completed_at = ts
  FROM waitpoint_view AS w
  WHERE e.run_id = refresh_blockers.run_id AND e.completed_at IS NULL AND w.id = e.waitpoint_id
    AND waitpoint_done(w.status, w.type, w.completed_after, ts);
  GET DIAGNOSTICS n = ROW_COUNT;
  IF NOT include_remote OR NOT peer_wired() THEN
    RETURN n;
  END IF;
  SELECT array_agg(e.waitpoint_id) INTO remote FROM run_waitpoints AS e
  WHERE e.run_id = refresh_blockers.run_id AND e.completed_at IS NULL
    AND try_classify_residency(e.waitpoint_id) <> local_residency();
  IF remote IS NULL THEN
    RETURN n;
  END IF;
  BEGIN
    -- = ANY and plain column predicates are shipped; the time comparison happens here.
    SELECT array_agg(w.id) INTO done FROM runops_peer.waitpoint_view AS w
    WHERE w.id = ANY (remote) AND waitpoint_done(w.status, w.type, w.completed_after, ts);
  EXCEPTION WHEN connection_exception THEN
    PERFORM raise_error('RO009', 'the other store is unavailable, so the run''s waitpoints there cannot be checked: '
                                 || SQLERRM);
  END;
  UPDATE run_waitpoints AS e SET completed_at = ts
  WHERE e.run_id = refresh_blockers.run_id AND e.completed_at IS NULL AND e.waitpoint_id = ANY (done);
  GET DIAGNOSTICS k = ROW_COUNT;
  RETURN n + k;
END
$$;

-- Adds an edge "run waits on waitpoint", born completed when the waitpoint already is.
CREATE OR REPLACE FUNCTION runops.add_blocker(run_id text, environment_id text, waitpoint_id text, done boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
  INSERT INTO run_waitpoints AS e (run_id, waitpoint_id, environment_id, completed_at, created_at)
  VALUES (add_blocker.run_id, add_blocker.waitpoint_id, add_blocker.environment_id,
          CASE WHEN done THEN now() END, now())
  ON CONFLICT ON CONSTRAINT run_waitpoints_pkey DO NOTHING;
END
$$;

CREATE OR REPLACE FUNCTION runops.create_waitpoint(environment_id text, type text, options jsonb DEFAULT '{}')
RETURNS TABLE (waitpoint_id text, is_cached boolean)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
  env_id text := create_waitpoint.environment_id;
  kind text := create_waitpoint.type;
  key text;
  key_ttl interval;
  due timestamptz;
  timeout interval;
  tags text[];
  env environment_context;
  residency text;
  existing record;
  new_id text;
  ts timestamptz := now();
BEGIN
  IF kind IS NULL OR kind NOT IN ('DATETIME', 'MANUAL') THEN
    PERFORM raise_invalid('waitpoint type', 'DATETIME or MANUAL', quote_nullable(kind),
                          'RUN and BATCH waitpoints come with their run or batch');
  END IF;
  PERFORM reject_unknown_options(o, ARRAY['idempotency_key', 'idempotency_key_ttl', 'completed_after', 'timeout',
                                          'tags'], 'waitpoint');
  key := option_idempotency_key(o);
  key_ttl := option_duration(o, 'idempotency_key_ttl', default_idempotency_key_ttl());
  IF kind = 'DATETIME' THEN
    due := option_moment(o, 'completed_after', ts);
    IF due IS NULL THEN
      PERFORM raise_error('RO006', 'a DATETIME waitpoint needs completed_after (a duration or a timestamp)');
    END IF;
  ELSIF option_text(o, 'completed_after') IS NOT NULL THEN
    PERFORM raise_error('RO006', 'completed_after is for DATETIME waitpoints; a MANUAL one takes timeout');
  END IF;
  IF kind <> 'MANUAL' AND option_value(o, 'timeout') IS NOT NULL THEN
    PERFORM raise_error('RO006', 'timeout is for MANUAL waitpoints');
  END IF;
  timeout := option_duration(o, 'timeout', NULL);
  tags := coalesce(option_text_array(o, 'tags'), '{}');
  IF cardinality(tags) > 10 THEN
    PERFORM raise_error('RO006', format('option tags has %s tags; the limit is 10', cardinality(tags)));
  END IF;
  IF EXISTS (SELECT FROM unnest(tags) AS t WHERE length(t) NOT BETWEEN 1 AND 128) THEN
    PERFORM raise_error('RO006', 'option tags must hold strings of 1 to 128 characters');
  END IF;
  env := load_environment(env_id);
  IF env.id IS NOT NULL THEN
    residency := root_residency(env);
    IF residency <> local_residency() THEN
      PERFORM raise_wrong_store('a new waitpoint of environment', env_id, store_for_residency(residency));
    END IF;
  END IF;
  env := require_usable(env, env_id);

  LOOP
    IF key IS NOT NULL THEN
      SELECT w.id, w.idempotency_key_expires_at AS expires_at INTO existing FROM waitpoints AS w
      WHERE w.environment_id = env.id AND w.idempotency_key = key;
      IF FOUND THEN
        IF NOT idempotency_key_expired(existing.expires_at, ts) THEN
          RETURN QUERY SELECT 'waitpoint_' || existing.id, true;
          RETURN;
        END IF;
        -- An expired key rotates: the old waitpoint lets go of it (waitpoint keys die only by
        -- expiry: docs/decisions.md).
        UPDATE waitpoints AS w SET idempotency_key = NULL, idempotency_key_expires_at = NULL
        WHERE w.id = existing.id AND w.idempotency_key = key;
      END IF;
    END IF;
    new_id := mint_id();
    INSERT INTO waitpoints (id, environment_id, type, status, completed_after, timeout_at, idempotency_key,
                            idempotency_key_expires_at, tags, created_at)
    VALUES (new_id, env.id, kind, 'PENDING', due, ts + timeout, key, CASE WHEN key IS NOT NULL THEN ts + key_ttl END,
            tags, ts)
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
      RETURN QUERY SELECT 'waitpoint_' || new_id, false;
      RETURN;
    END IF;
  END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION runops.block_run(run_id text, waitpoint_ids text[], options jsonb DEFAULT '{}',
                                            environment_id text DEFAULT NULL)
RETURNS SETOF runops.run_view
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  o jsonb := require_object(options, 'options');
  bare_ids text[] := '{}'::text[];
  found_waitpoints waitpoint_view[] := '{}'::waitpoint_view[];
  raw text;
  run_bare text;
  r runs;
  w waitpoint_view;
  ts timestamptz := now();
BEGIN
  PERFORM reject_unknown_options(o, ARRAY[]::text[], 'block_run');
  IF waitpoint_ids IS NULL OR cardinality(waitpoint_ids) NOT BETWEEN 1 AND 100 THEN
    PERFORM raise_error('RO006', 'waitpoint_ids must name 1 to 100 waitpoints');
  END IF;
  run_bare := bare_id(block_run.run_id, 'run');
  FOREACH raw IN ARRAY waitpoint_ids LOOP
    raw := bare_id(raw, 'waitpoint');
    IF raw IS NOT NULL AND raw = run_bare THEN
      PERFORM raise_error('RO006', format('run_%s cannot wait on its own waitpoint', run_bare));
    END IF;
  END LOOP;
  FOREACH raw IN ARRAY waitpoint_ids LOOP
    bare_ids := bare_ids || require_id(raw, 'waitpoint', 'waitpoint id');
  END LOOP;
  r := lock_run(block_run.run_id, block_run.environment_id);
  FOREACH raw IN ARRAY bare_ids LOOP
    SELECT * INTO w FROM find_waitpoint(raw);
    IF w.id IS NULL OR w.environment_id <> r.environment_id THEN
      PERFORM raise_error('RO004', format('waitpoint_%s not found in environment %s', raw, r.environment_id));
    END IF;
    found_waitpoints := found_waitpoints || w;
  END LOOP;
  IF is_final_status(r.status) THEN
    PERFORM raise_error('RO003', format('run_%s is %s: a final run waits for nothing', r.id, r.status));
  END IF;
  FOREACH w IN ARRAY found_waitpoints LOOP
    -- An edge on a waitpoint that is already done is born done: blocking never hangs.
    PERFORM add_blocker(r.id, r.environment_id, w.id, waitpoint_done(w.status, w.type, w.completed_after, ts));
  END LOOP;
  IF r.status = 'WAITING_TO_RESUME' THEN
    PERFORM resume_if_unblocked(r.id, false);
  END IF;
  RETURN QUERY SELECT * FROM run_view AS v WHERE v.id = r.id;
END
$$;

CREATE OR REPLACE FUNCTION runops.complete_waitpoint(waitpoint_id text, output jsonb DEFAULT NULL,
                                                     is_error boolean DEFAULT false, environment_id text DEFAULT NULL)
RETURNS TABLE (completed_now boolean, unblocked_run_ids text[], remote_run_ids text[])
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text;
  w waitpoints;
  unblocked text[] := '{}'::text[];
  remote text[] := '{}'::text[];
  now_done boolean := false;
  env_id text := complete_waitpoint.environment_id;
BEGIN
  PERFORM check_json_bounds(complete_waitpoint.output, 'output');
  bare := require_local_id(complete_waitpoint.waitpoint_id, 'waitpoint', 'waitpoint_id');
  SELECT * INTO w FROM waitpoints AS x WHERE x.id = bare FOR UPDATE;
  IF FOUND THEN
    PERFORM require_row_environment(w.environment_id, env_id, 'waitpoint', complete_waitpoint.waitpoint_id);
  ELSE
    -- Another environment's run or batch is "not found" (RO004 comes before RO003).
    IF EXISTS (SELECT FROM runs AS x WHERE x.id = bare AND (env_id IS NULL OR x.environment_id = env_id)) THEN
      PERFORM raise_error('RO003', format('%s is a RUN waitpoint: it completes when its run does',
                                          complete_waitpoint.waitpoint_id));
    END IF;
    IF EXISTS (SELECT FROM batches AS x WHERE x.id = bare AND (env_id IS NULL OR x.environment_id = env_id)) THEN
      PERFORM raise_error('RO003', format('%s is a BATCH waitpoint: it completes when its batch does',
                                          complete_waitpoint.waitpoint_id));
    END IF;
    PERFORM raise_error('RO004', format('waitpoint %s not found', complete_waitpoint.waitpoint_id));
  END IF;
  -- Idempotent: a second call completes nothing and unblocks nobody.
  IF w.status = 'PENDING' THEN
    UPDATE waitpoints AS x
    SET status = 'COMPLETED', output = complete_waitpoint.output,
        output_is_error = coalesce(complete_waitpoint.is_error, false), completed_at = now()
    WHERE x.id = bare;
    now_done := true;
    unblocked := resume_local_waiters(bare);
  END IF;
  IF peer_wired() THEN
    BEGIN
      SELECT coalesce(array_agg(e.run_id ORDER BY e.run_id), '{}'::text[]) INTO remote
      FROM runops_peer.run_waitpoints AS e WHERE e.waitpoint_id = bare AND e.completed_at IS NULL;
    EXCEPTION WHEN connection_exception THEN
      remote := '{}'::text[];  -- tick in the other store finds them when it is back
    END;
  END IF;
  RETURN QUERY SELECT now_done, friendly_ids(unblocked, 'run'), friendly_ids(remote, 'run');
END
$$;

CREATE OR REPLACE FUNCTION runops.get_waitpoint(waitpoint_id text, environment_id text DEFAULT NULL)
RETURNS SETOF runops.waitpoint_row
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = runops, pg_catalog, pg_temp
AS $$
DECLARE
  bare text := bare_id(get_waitpoint.waitpoint_id, 'waitpoint');
BEGIN
  RETURN QUERY
  SELECT w.waitpoint_id, w.environment_id, w.type,
         -- a due DATETIME waitpoint reads as completed even before tick marks it
         CASE WHEN waitpoint_done(w.status, w.type, w.completed_after, now()) THEN 'COMPLETED' ELSE w.status END,
         w.output, w.output_is_error, coalesce(w.completed_at, CASE WHEN w.status = 'PENDING'
                                                               AND waitpoint_done(w.status, w.type, w.completed_after, now())
                                                               THEN w.completed_after END),
         w.completed_after, w.idempotency_key
  FROM find_waitpoint(bare) AS w
  WHERE get_waitpoint.environment_id IS NULL OR w.environment_id = get_waitpoint.environment_id;
END
$$;

-- sql/after_functions.sql
-- Applied after every function file: ownership and grants. Applications (runops_app) may EXECUTE
-- the public API and nothing else; internal helpers stay with the owner. The FDW login (runops_fdw) may call what
-- the identity views need.
-- The SECURITY DEFINER functions must run as the NOLOGIN owner, never as the installing superuser.
DO $$
DECLARE
  f regprocedure;
  kind "char";
BEGIN
  FOR f, kind IN SELECT p.oid, p.prokind FROM pg_catalog.pg_proc AS p
           WHERE p.pronamespace = 'runops'::regnamespace
             AND p.proowner <> 'runops_owner'::regrole LOOP
    EXECUTE pg_catalog.format('ALTER %s %s OWNER TO runops_owner',
                              CASE kind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, f);
  END LOOP;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA runops FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA runops FROM PUBLIC;

-- Identity functions are plain (SECURITY INVOKER); their helpers must be callable too.
GRANT EXECUTE ON FUNCTION
  runops.classify_residency(text), runops.try_classify_residency(text), runops.generate_ksuid(),
  runops.generate_cuid(), runops.ksuid_timestamp(text), runops.store_role(), runops.store_identity(),
  runops.now(), runops.ksuid_encode(bytea), runops.base36_digits4(bigint), runops.base36_digits8(bigint),
  runops.base62_digits4(bigint), runops.base62_digits7(bigint), runops.base62_digits10(bigint)
  TO runops_app, runops_fdw;
GRANT EXECUTE ON FUNCTION runops.peer_identity() TO runops_fdw;

GRANT EXECUTE ON FUNCTION
  runops.trigger_run(text, text, jsonb, jsonb),
  runops.trigger_route(text, jsonb),
  runops.reset_idempotency_key(text, text, text, text, text, integer),
  runops.get_run(text, text),
  runops.list_runs(text, integer, text, jsonb),
  runops.list_store_runs(text, integer, text, jsonb),
  runops.purge_runs(text, integer),
  runops.list_environments(text),
  runops.metrics(text),
  runops.finalize_run(text, text, jsonb, jsonb, text),
  runops.create_organization(text, jsonb),
  runops.create_project(text, text),
  runops.create_environment(text, text, text),
  runops.update_environment(text, jsonb),
  runops.split_status(),
  runops.enable_split(),
  runops.disable_split(),
  runops.set_mint_kind(text, text),
  runops.set_default_mint_kind(text),
  runops.pull_tenant_mirror(),
  runops.mirror_status(),
  runops.mirror_fingerprint(),
  runops.dequeue_runs(text, text, integer, jsonb),
  runops.heartbeat_run(text, text, text),
  runops.start_attempt(text, text, text),
  runops.complete_attempt(text, integer, jsonb, text),
  runops.fail_attempt(text, integer, jsonb, timestamptz, text),
  runops.create_checkpoint(text, integer, text, text, jsonb, text),
  runops.resume_run(text, text),
  runops.cancel_run(text, text, text),
  runops.cancel_dev_session_runs(text, text),
  runops.execute_tasks_waiting_for_deploy(text, text[]),
  runops.trigger_failed_task(text, text, jsonb, jsonb, jsonb),
  runops.enqueue_delayed_runs(integer),
  runops.expire_enqueued_runs(integer),
  runops.tick(integer),
  runops.create_waitpoint(text, text, jsonb),
  runops.block_run(text, text[], jsonb, text),
  runops.complete_waitpoint(text, jsonb, boolean, text),
  runops.get_waitpoint(text, text),
  runops.batch_trigger(text, jsonb, jsonb),
  runops.create_batch(text, integer, jsonb),
  runops.append_batch_items(text, integer, jsonb, text),
  runops.seal_batch(text, text),
  runops.get_batch(text, text),
  runops.resume_batch_run(text, text)
  TO runops_app;
GRANT EXECUTE ON PROCEDURE runops.tick_every(integer, integer, integer) TO runops_app;
'''


def render(sql: str, store: str) -> str:
    sql = sql.replace("RESIDENCY_OF_THIS_STORE", RESIDENCIES[store])
    return re.sub(r"RESIDENCY_CHECK\((\w+)\)", lambda m: RESIDENCY_CHECKS[store].format(col=m.group(1)), sql)


def upgrade(op, store: str) -> None:
    # The driver connection runs the text as one simple query: no parameter parsing of the
    # PL/pgSQL bodies, and the same transaction Alembic opened.
    op.get_bind().connection.driver_connection.execute(render(SQL, store) + SEEDS[store])


def downgrade(op) -> None:
    raise NotImplementedError("r0004_speed is not reversible in place: restore the pre-upgrade backup, "
                              "or install the older release into a fresh store")
