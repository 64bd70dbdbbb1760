-- Raising errors: every failure is an RO SQLSTATE with a message that says what was wrong, with
-- which value, and what is accepted (SPEC §3).
--
--   input_prefix             the short prefix of an input a message may quote
--   raise_error              the one RAISE (cuts message, detail and hint at 512 characters)
--   raise_invalid            RO006 "<what> must be <expected>, got <got>": the one wording of bad input
--   raise_wrong_store        RO002 naming the owning store in DETAIL
--   require_row_environment  the environment guard (SPEC §3 [1.2]): another environment's row is RO004
--
-- Internal helpers (here and in the other files) carry no SET search_path: only the owner may
-- execute them, always from a public function whose search_path is pinned, and a SET clause
-- would stop PostgreSQL inlining the SQL ones and cost a GUC save/restore per call.

-- At most a short prefix of any input a message quotes (SPEC §3 [1.2]): a 1 MB id must not
-- reach the log whole. Every message that quotes a caller's value quotes it through this. Granted
-- with the identity functions, which are plain (SECURITY INVOKER) and run under the caller's
-- search_path: hence the qualified names.
CREATE OR REPLACE FUNCTION runops.input_prefix(value text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT CASE WHEN pg_catalog.length(value) > 100 THEN pg_catalog.left(value, 100) || '...' ELSE value END
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
    format('%s %s belongs to the %s store, not this %s store', what, input_prefix(id), owning_store, store_role()),
    'owning_store=' || owning_store,
    'call this function on the store named in DETAIL (the Python client does this for you)');
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
