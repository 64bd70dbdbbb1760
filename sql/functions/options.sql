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
--   only_a_valid_key        options that are exactly one valid key (the keyed fast path's test)
--   parse_trigger_options   trigger_run's options -> trigger_spec, with the defaults
--   parse_batch_options     batch_trigger/create_batch's options
--   validate_new_run        trigger_run and trigger_failed_task: every RO006 of one run
--   validate_batch_items    the same rules, set-based, for a chunk of batch items

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

-- The idempotency_key option of runs, batches and waitpoints: a string, a valid key when given
-- (idempotency_key_is_valid).
CREATE OR REPLACE FUNCTION runops.option_idempotency_key(options jsonb)
RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
DECLARE
  key text := option_text(options, 'idempotency_key');
BEGIN
  IF key IS NOT NULL THEN
    PERFORM require_valid_idempotency_key(key, 'option idempotency_key');
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
                   AND runops.idempotency_key_is_valid(options ->> 'idempotency_key')
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
    PERFORM raise_invalid('option idempotency_key_scope', 'run, attempt or global',
                          quote_nullable(input_prefix(spec.idempotency_key_scope)));
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
    -- Items whose options are more than none or one valid key (parse_trigger_options' own test).
    WHERE NOT (coalesce(nullif(e.item -> 'options', 'null'::jsonb), '{}'::jsonb) = '{}'::jsonb
               OR only_a_valid_key(e.item -> 'options'))
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
