-- Input parsing shared by every public function. Each failure is an RO SQLSTATE with a message
-- that says what was wrong, with which value, and what is accepted.
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
    PERFORM raise_error('RO006', format('%s must be a duration like 30s, 10m, 2h, 7d or 1w, got %s',
                                         what, quote_nullable(input_prefix(value))));
  END IF;
  -- Bound the seconds before building an interval: 999999999999w would overflow it.
  amount := left(value, -1)::numeric * CASE right(value, 1)
              WHEN 's' THEN 1 WHEN 'm' THEN 60 WHEN 'h' THEN 3600 WHEN 'd' THEN 86400 ELSE 604800 END;
  IF amount > 365 * 86400 THEN
    PERFORM raise_error('RO006', format('%s must be at most 365 days, got %s', what, value));
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
    PERFORM raise_error('RO006', format('%s must be a duration or a timestamp with an offset (2030-01-01T00:00:00Z), got %s',
                                         what, quote_nullable(input_prefix(value))));
  END IF;
  RETURN value::timestamptz;
EXCEPTION
  WHEN data_exception THEN  -- month 13, offset +99, ...: any bad timestamp is the caller's input
    PERFORM raise_error('RO006', format('%s is not a valid timestamp: %s', what, input_prefix(value)));
    RETURN NULL;
END
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
    PERFORM raise_error('RO006', format('%s must be a JSON object, got %s', what, jsonb_typeof(value)));
  END IF;
  RETURN value;
END
$$;

-- Reads options[key] as the JSON type a caller must use; NULL when absent or JSON null. At most
-- max_length characters and never more than 2048 bytes (max_index_text_bytes): option texts end
-- up in btree indexes (keys, queues), whose entries must stay under ~2.7 kB.
CREATE OR REPLACE FUNCTION runops.option_text(options jsonb, key text, max_length integer DEFAULT 2048)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  value jsonb := options -> key;
BEGIN
  IF value IS NULL OR value = 'null'::jsonb THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(value) <> 'string' THEN
    PERFORM raise_error('RO006', format('option %s must be a string, got %s', key, jsonb_typeof(value)));
  END IF;
  IF length(value #>> '{}') > max_length THEN
    PERFORM raise_error('RO006', format('option %s is %s characters long; the limit is %s',
                                         key, length(value #>> '{}'), max_length));
  END IF;
  IF octet_length(value #>> '{}') > max_index_text_bytes() THEN
    PERFORM raise_error('RO006', format('option %s is %s bytes long in UTF-8; the limit is %s bytes',
                                         key, octet_length(value #>> '{}'), max_index_text_bytes()));
  END IF;
  RETURN value #>> '{}';
END
$$;

CREATE OR REPLACE FUNCTION runops.option_integer(options jsonb, key text, min_value integer, max_value integer)
RETURNS integer
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  value jsonb := options -> key;
BEGIN
  IF value IS NULL OR value = 'null'::jsonb THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(value) <> 'number' OR (value #>> '{}') !~ '^-?\d{1,10}$'
     OR (value #>> '{}')::bigint NOT BETWEEN min_value AND max_value THEN
    PERFORM raise_error('RO006', format('option %s must be an integer from %s to %s, got %s',
                                         key, min_value, max_value, input_prefix(value::text)));
  END IF;
  RETURN (value #>> '{}')::integer;
END
$$;

CREATE OR REPLACE FUNCTION runops.option_boolean(options jsonb, key text)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  value jsonb := options -> key;
BEGIN
  IF value IS NULL OR value = 'null'::jsonb THEN
    RETURN NULL;
  END IF;
  IF jsonb_typeof(value) <> 'boolean' THEN
    PERFORM raise_error('RO006', format('option %s must be true or false, got %s', key, input_prefix(value::text)));
  END IF;
  RETURN value::text::boolean;
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

-- Bounded input (SPEC §3 [1.2]): nothing the API accepts may break a reader or an index.
--
--   max_index_text_bytes  every indexed text (keys, tags, queues, task ids) is at most 2048 bytes
--                         in UTF-8 as well as its character limit: a btree entry must stay under
--                         ~2.7 kB, and 2048 four-byte characters would not (54000).
--   check_json_bounds     payload, metadata, output and error: at most store_config.max_json_bytes
--                         serialized (default 3 MiB) and max_json_depth levels of nesting
--                         (default 64; psycopg's json loader recurses, 1500 levels kill it).
-- The limits are read from store_config only for values that could exceed the smallest limit a
-- store may configure (64 KiB, 32 levels): the common small payload costs one conversion to
-- text and a jsonpath walk of its first 32 levels.

CREATE OR REPLACE FUNCTION runops.max_index_text_bytes()
RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$
  SELECT 2048
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

CREATE OR REPLACE FUNCTION runops.check_json_bounds(value jsonb, what text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  bytes integer;
BEGIN
  IF value IS NULL THEN
    RETURN;
  END IF;
  -- The conversion is the cost (about as much as writing the value); no bound on the stored
  -- jsonb size can replace it: a 10-byte numeric 1e100000 prints as 100001 digits.
  bytes := octet_length(value::text);
  IF bytes <= 65536
     AND NOT jsonb_path_exists(value, 'strict $.**{32} ? (@.type() == "array" || @.type() == "object")') THEN
    RETURN;
  END IF;
  PERFORM check_json_limits(value, bytes, what);
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
