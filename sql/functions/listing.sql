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
    PERFORM raise_error('RO006', format('cursor %s is not a list_runs cursor', quote_literal(input_prefix(cursor))),
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
      PERFORM raise_error('RO006', format('filter batch_id %s is not a batch id', input_prefix(raw)));
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
