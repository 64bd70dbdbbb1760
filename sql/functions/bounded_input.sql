-- Bounded input: the limits every entry point checks before it looks anything up (SPEC §3 [1.2]),
-- each failure RO006. Each rule is one predicate (inlined SQL, so a fast path holds it in its
-- query); a raising function only explains which part failed. The validation of a whole run or
-- batch chunk is built from these in options.sql (validate_new_run, validate_batch_items).
--
--   max_index_text_bytes  every indexed text (keys, tags, queues, task ids) is at most 2048 bytes
--                         in UTF-8 as well as its character limit: a btree entry must stay under
--                         ~2.7 kB, and 2048 four-byte characters would not (54000).
--   check_json_bounds     payload, metadata, output and error: at most store_config.max_json_bytes
--                         serialized (default 3 MiB) and max_json_depth levels of nesting
--                         (default 64; psycopg's json loader recurses, 1500 levels kill it).
--   require_between       a whole-number argument within its bounds (max_rows, max_runs, attempt numbers)
--   task_identifier_is_valid   1-128 of [A-Za-z0-9_.:/-]
--   idempotency_key_is_valid   1-2048 characters and bytes; require_valid_idempotency_key explains
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


-- What a valid idempotency key is, for runs, batches, batch items, waitpoints and resets: 1 to
-- 2048 characters, and within max_index_text_bytes() in UTF-8 (it is stored and indexed). The one
-- rule: the keyed fast path holds it in only_a_valid_key, every other reader goes through
-- require_valid_idempotency_key. NULL (no key) is not valid.
CREATE OR REPLACE FUNCTION runops.idempotency_key_is_valid(key text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
  SELECT length(key) BETWEEN 1 AND 2048 AND octet_length(key) <= runops.max_index_text_bytes()
$$;

-- RO006 unless idempotency_key_is_valid(key), which alone decides; this only says which part of
-- the rule failed (and, for a part it does not know, that the key is not valid). Returns the key.
CREATE OR REPLACE FUNCTION runops.require_valid_idempotency_key(key text, what text)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
  IF idempotency_key_is_valid(key) IS NOT TRUE THEN
    PERFORM raise_error('RO006', CASE
      WHEN key IS NULL THEN format('%s is required', what)
      WHEN key = '' THEN format('%s must not be empty', what)
      WHEN length(key) > 2048 THEN format('%s is %s characters long; the limit is 2048', what, length(key))
      WHEN octet_length(key) > max_index_text_bytes()
        THEN format('%s is %s bytes long in UTF-8; the limit is %s bytes', what, octet_length(key),
                    max_index_text_bytes())
      ELSE format('%s %s is not a valid idempotency key', what, quote_literal(input_prefix(key))) END);
  END IF;
  RETURN key;
END
$$;
