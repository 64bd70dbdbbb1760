-- Parsed forms that internal functions pass around. They are not part of the public API
-- (public arguments are only text, jsonb, integer, boolean, timestamptz).

-- A trigger's options after validation; ids are bare.
CREATE TYPE runops.trigger_spec AS (
  idempotency_key             text,
  idempotency_key_scope       text,
  idempotency_key_ttl         interval,
  parent_run_id               text,
  parent_attempt_number       integer,
  resume_parent_on_completion boolean,
  delay_until                 timestamptz,
  ttl                         interval,
  max_duration                interval,
  queue                       text,
  concurrency_key             text,
  tags                        text[],
  max_attempts                integer,
  metadata                    jsonb,
  run_id                      text,
  batch_id                    text,
  batch_index                 integer,
  dev_session_id              text
);

-- What new work needs to know about an environment, from the local tables or the mirror,
-- read in one query together with the split settings that decide where its roots live.
CREATE TYPE runops.environment_context AS (
  id                        text,
  project_id                text,
  organization_id           text,
  type                      text,
  paused                    boolean,
  archived                  boolean,
  project_deleted           boolean,
  runs_enabled              boolean,
  mint_kind                 text,
  maximum_concurrency_limit integer,
  notifications             boolean,
  split_enabled             boolean,
  split_ever_enabled        boolean,
  default_mint_kind         text
);
-- The row get_waitpoint answers with (its parameter is named waitpoint_id too, which a
-- RETURNS TABLE column may not be).
CREATE TYPE runops.waitpoint_row AS (
  waitpoint_id    text,
  environment_id  text,
  type            text,
  status          text,
  output          jsonb,
  output_is_error boolean,
  completed_at    timestamptz,
  completed_after timestamptz,
  idempotency_key text
);
-- The row get_batch answers with.
CREATE TYPE runops.batch_row AS (
  batch_id        text,
  environment_id  text,
  status          text,
  expected_count  integer,
  item_count      integer,
  run_ids         text[],
  is_sealed       boolean,
  created_at      timestamptz,
  completed_at    timestamptz,
  idempotency_key text
);
-- What append_batch_items and seal_batch answer with (their parameter is named batch_id too).
CREATE TYPE runops.appended_items AS (batch_id text, first_index integer, run_ids text[]);
CREATE TYPE runops.sealed_batch AS (batch_id text, status text, item_count integer, expected_count integer);
-- What replay_run answers with: trigger_run's row (its parameter is named run_id too).
CREATE TYPE runops.replayed_run AS (run_id text, is_cached boolean, status text, residency text);
ALTER TYPE runops.trigger_spec OWNER TO runops_owner;
ALTER TYPE runops.appended_items OWNER TO runops_owner;
ALTER TYPE runops.sealed_batch OWNER TO runops_owner;
ALTER TYPE runops.replayed_run OWNER TO runops_owner;
ALTER TYPE runops.batch_row OWNER TO runops_owner;
ALTER TYPE runops.waitpoint_row OWNER TO runops_owner;
ALTER TYPE runops.environment_context OWNER TO runops_owner;

-- list_runs filters, parsed (NULL: no filter).
CREATE TYPE runops.list_filters AS (
  statuses         text[],       -- any of
  task_identifiers text[],       -- any of
  tags             text[],       -- all of
  created_after    timestamptz,  -- exclusive
  created_before   timestamptz,  -- exclusive
  batch_id         text          -- friendly, as run_view shows it
);
ALTER TYPE runops.list_filters OWNER TO runops_owner;
