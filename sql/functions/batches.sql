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

-- Creates or finds the runs of a validated chunk (validate_batch_items) set-based and attaches
-- them at first_index onwards. Indexes the batch already holds keep their first content. Returns
-- the item run ids (friendly), in order.
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
  anchored record;
  parent runs;
  new_id text;
  ts timestamptz := now();
BEGIN
  IF expected_count IS NULL OR expected_count NOT BETWEEN 1 AND 100000 THEN
    PERFORM raise_error('RO006', format('a batch holds 1 to 100000 items, got %s', quote_nullable(expected_count)));
  END IF;
  spec.parent_run_id := o.parent_run_id;
  spec.resume_parent_on_completion := o.resume_parent_on_completion;
  anchored := admit_anchored(claim_batch.environment_id, spec, 'a new batch');
  env := anchored.env;
  parent := anchored.parent;
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
  env := require_environment_for_new_work(b.environment_id);
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
                                        input_prefix(lock_batch_for_index.environment_id)));
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
