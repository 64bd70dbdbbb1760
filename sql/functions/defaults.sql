-- Defaults, once (SPEC §4): every entry point that leaves one of these out gets the value here.
-- Plain IMMUTABLE SQL, so PostgreSQL folds each into the plans that use it: a constant, not a call.
--
--   default_idempotency_key_ttl  how long a key lives: runs, batches, batch items, waitpoints (30 days)
--   default_max_attempts         attempts a run gets (3; runs.max_attempts carries the same DEFAULT)
--   default_seal_timeout         how long an open batch waits to be sealed (10 minutes)
--   default_lease                how long a dequeued run stays a worker's between heartbeats (5 minutes)
--   default_bulk_chunk_size      runs a bulk action acts on per chunk, one transaction each (5,000: large
--                                enough for 10k runs/s across both stores, small enough to hold a chunk's
--                                locks well under a second)
--   default_alert_lease          how long a claimed alert stays its deliverer's (2 minutes)
--   default_alert_max_attempts   deliveries an alert gets before it is FAILED (10)
--   alert_retry_delay(n)         the pause after the n-th failed delivery: 5 s, doubling, at most
--                                1 hour (5 s, 10 s, 20 s, ... ; about 42 minutes over 10 attempts)

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

CREATE OR REPLACE FUNCTION runops.default_bulk_chunk_size()
RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$
  SELECT 5000
$$;

CREATE OR REPLACE FUNCTION runops.default_alert_lease()
RETURNS interval
LANGUAGE sql IMMUTABLE
AS $$
  SELECT interval '2 minutes'
$$;

CREATE OR REPLACE FUNCTION runops.default_alert_max_attempts()
RETURNS integer
LANGUAGE sql IMMUTABLE
AS $$
  SELECT 10
$$;

CREATE OR REPLACE FUNCTION runops.alert_retry_delay(failed_attempts integer)
RETURNS interval
LANGUAGE sql IMMUTABLE
AS $$
  SELECT least(interval '5 seconds' * power(2, least(greatest(failed_attempts, 1) - 1, 20)), interval '1 hour')
$$;
