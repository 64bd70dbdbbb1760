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
