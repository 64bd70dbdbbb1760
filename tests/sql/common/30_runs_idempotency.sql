-- Runs in this store: trigger, get_run, idempotency (SPEC §4 "Trigger and idempotency"),
-- finalize_run and the lifecycle guard, and the residency CHECK (SPEC §2), on either store.
-- Time is frozen with runops.fake_now (honoured: the tests run as the superuser).
BEGIN;
SET LOCAL search_path = tap, public;
\ir ../lib/helpers.sql
SELECT plan(72);

SET LOCAL runops.fake_now = '2031-01-01 00:00:00+00';
SELECT pg_temp.set_split(true, true);
SELECT set_config('t.local_store', runops.store_role(), true),
       set_config('t.residency', CASE runops.store_role() WHEN 'CONTROL_PLANE' THEN 'LEGACY' ELSE 'NEW' END, true),
       set_config('t.kind', CASE runops.store_role() WHEN 'CONTROL_PLANE' THEN 'cuid' ELSE 'ksuid' END, true);
SELECT set_config('t.env', pg_temp.make_env(current_setting('t.kind')), true),
       set_config('t.env2', pg_temp.make_env(current_setting('t.kind')), true),
       set_config('t.local_id', CASE runops.store_role() WHEN 'CONTROL_PLANE' THEN runops.generate_cuid() ELSE runops.generate_ksuid() END, true),
       set_config('t.other_id', CASE runops.store_role() WHEN 'CONTROL_PLANE' THEN runops.generate_ksuid() ELSE runops.generate_cuid() END, true);

-- A plain trigger, read back.
CREATE TEMP TABLE plain ON COMMIT DROP AS
  SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/plain', '{"n": 1}',
                                   '{"tags": ["b", "a"], "metadata": {"m": true}, "max_attempts": 5}');
SELECT is((SELECT p.is_cached FROM plain AS p), false, 'a new run is not cached');
SELECT is((SELECT p.residency FROM plain AS p), current_setting('t.residency'), 'the run has this store''s residency');
SELECT is((SELECT runops.classify_residency(p.run_id) FROM plain AS p), current_setting('t.residency'),
          'the run id has this store''s shape');
SELECT matches((SELECT p.run_id FROM plain AS p), '^run_', 'run ids are returned in friendly form');
SELECT results_eq(
  $$ SELECT v.run_id COLLATE "default", v.environment_id COLLATE "default", v.task_identifier, v.status, v.residency, v.payload, v.tags, v.metadata,
            v.max_attempts, v.attempt_number, v.queue, v.created_at, v.queued_at, v.idempotency_key
     FROM runops.get_run((SELECT p.run_id FROM plain AS p)) AS v $$,
  $$ SELECT (SELECT p.run_id FROM plain AS p), current_setting('t.env'), 'pgtap/plain'::text, 'PENDING'::text,
            current_setting('t.residency'), '{"n": 1}'::jsonb, ARRAY['a', 'b'], '{"m": true}'::jsonb, 5, 0,
            'task/pgtap/plain'::text, '2031-01-01 00:00:00+00'::timestamptz, '2031-01-01 00:00:00+00'::timestamptz,
            NULL::text $$,
  'get_run returns the run as triggered (created and queued at runops.now())');
SELECT is((SELECT pg_catalog.count(*)::integer FROM runops.get_run((SELECT p.run_id FROM plain AS p), current_setting('t.env'))),
          1, 'get_run with the right environment finds the run');
SELECT is_empty($$ SELECT * FROM runops.get_run((SELECT p.run_id FROM plain AS p), current_setting('t.env2')) $$,
                'get_run with another environment returns no row');
SELECT is((SELECT pg_catalog.count(*)::integer FROM runops.get_run(pg_catalog.substr((SELECT p.run_id FROM plain AS p), 5))),
          1, 'get_run accepts the bare id');
SELECT is_empty($$ SELECT * FROM runops.get_run('batch_' || pg_catalog.substr((SELECT p.run_id FROM plain AS p), 5)) $$,
                'get_run with another kind''s prefix returns no row');
SELECT is_empty($$ SELECT * FROM runops.get_run('run_nope') $$, 'get_run of an unclassifiable id returns no row');
SELECT is_empty($$ SELECT * FROM runops.get_run(NULL) $$, 'get_run of NULL returns no row');
SELECT is_empty($$ SELECT * FROM runops.get_run('run_' || current_setting('t.local_id')) $$, 'get_run of a missing local id returns no row');
SELECT is_empty($$ SELECT * FROM runops.get_run('run_' || current_setting('t.other_id')) $$,
                'get_run of a missing id of the other store (read through the FDW) returns no row');

-- Idempotency: the same key twice is the same run.
CREATE TEMP TABLE k1 ON COMMIT DROP AS
  SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/keyed', '{}', '{"idempotency_key": "key-1"}');
CREATE TEMP TABLE k1_again ON COMMIT DROP AS
  SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/keyed', '{"other": "payload"}', '{"idempotency_key": "key-1"}');
SELECT is((SELECT k.is_cached FROM k1 AS k), false, 'the first trigger with a key creates a run');
SELECT is((SELECT k.run_id FROM k1_again AS k), (SELECT k.run_id FROM k1 AS k), 'the same key again returns the same run_id');
SELECT is((SELECT k.is_cached FROM k1_again AS k), true, '... with is_cached true');
SELECT is((SELECT pg_catalog.count(*)::integer FROM runops.runs AS r
           WHERE r.environment_id = current_setting('t.env') AND r.task_identifier = 'pgtap/keyed'),
          1, 'only one run exists for the key');
SELECT is((SELECT v.payload FROM runops.get_run((SELECT k.run_id FROM k1 AS k)) AS v), '{}'::jsonb,
          'a cached trigger does not change the run');
SELECT results_eq(
  $$ SELECT v.idempotency_key, v.idempotency_key_scope, v.idempotency_key_expires_at
     FROM runops.get_run((SELECT k.run_id FROM k1 AS k)) AS v $$,
  $$ VALUES ('key-1'::text, 'global'::text, '2031-01-31 00:00:00+00'::timestamptz) $$,
  'the run shows the raw key, scope global (no parent) and the default 30d expiry');
SELECT is((SELECT r.idempotency_key_hash FROM runops.runs AS r WHERE 'run_' || r.id = (SELECT k.run_id FROM k1 AS k)),
          pg_temp.spec_hash('key-1'),
          'the dedup hash of a root key is sha256 of the key alone (salt [])');
SELECT isnt((SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/other-task', '{}', '{"idempotency_key": "key-1"}') AS t),
            (SELECT k.run_id FROM k1 AS k), 'the same key for another task is another run');
SELECT isnt((SELECT t.run_id FROM runops.trigger_run(current_setting('t.env2'), 'pgtap/keyed', '{}', '{"idempotency_key": "key-1"}') AS t),
            (SELECT k.run_id FROM k1 AS k), 'the same key in another environment is another run');
SELECT is((SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/keyed', '{}',
                                                   '{"idempotency_key": "key-1", "idempotency_key_scope": "attempt"}') AS t),
          (SELECT k.run_id FROM k1 AS k), 'without a parent every scope acts as global');

-- Scopes of children: the salt is the parent's friendly id (run), plus the attempt (attempt).
SELECT set_config('t.parent', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/parent') AS t), true),
       set_config('t.parent2', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/parent') AS t), true);
SELECT set_config('t.child_run', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/child', '{}',
         pg_catalog.jsonb_build_object('parent_run_id', current_setting('t.parent'), 'idempotency_key', 'ck')) AS t), true),
       set_config('t.child_attempt', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/child', '{}',
         pg_catalog.jsonb_build_object('parent_run_id', current_setting('t.parent'), 'idempotency_key', 'ck',
                                       'idempotency_key_scope', 'attempt', 'parent_attempt_number', 2)) AS t), true),
       set_config('t.child_global', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/child', '{}',
         pg_catalog.jsonb_build_object('parent_run_id', current_setting('t.parent'), 'idempotency_key', 'ck',
                                       'idempotency_key_scope', 'global')) AS t), true);
SELECT is((SELECT r.idempotency_key_hash FROM runops.runs AS r WHERE 'run_' || r.id = current_setting('t.child_run')),
          pg_temp.spec_hash('ck', ARRAY[current_setting('t.parent')]),
          'run scope: the salt is [parent run friendly id]');
SELECT is((SELECT r.idempotency_key_hash FROM runops.runs AS r WHERE 'run_' || r.id = current_setting('t.child_attempt')),
          pg_temp.spec_hash('ck', ARRAY[current_setting('t.parent'), '2']),
          'attempt scope: the salt is [parent run friendly id, attempt number]');
SELECT is((SELECT r.idempotency_key_hash FROM runops.runs AS r WHERE 'run_' || r.id = current_setting('t.child_global')),
          pg_temp.spec_hash('ck'), 'global scope: the salt is [] even with a parent');
SELECT is((SELECT pg_catalog.count(DISTINCT x)::integer
           FROM pg_catalog.unnest(ARRAY[current_setting('t.child_run'), current_setting('t.child_attempt'),
                                        current_setting('t.child_global')]) AS x),
          3, 'the three scopes of one key are three runs');
SELECT results_eq(
  $$ SELECT v.parent_run_id COLLATE "default", v.root_run_id COLLATE "default", v.idempotency_key_scope FROM runops.get_run(current_setting('t.child_run')) AS v $$,
  $$ VALUES (current_setting('t.parent'), current_setting('t.parent'), 'run'::text) $$,
  'a child records its parent, its root and its key scope');
SELECT isnt((SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/child', '{}',
               pg_catalog.jsonb_build_object('parent_run_id', current_setting('t.parent2'), 'idempotency_key', 'ck')) AS t),
            current_setting('t.child_run'), 'run scope: the same key under another parent is another run');
SELECT results_eq(
  $$ SELECT t.run_id, t.is_cached FROM runops.trigger_run(current_setting('t.env'), 'pgtap/child', '{}',
       pg_catalog.jsonb_build_object('parent_run_id', current_setting('t.parent2'), 'idempotency_key', 'ck',
                                     'idempotency_key_scope', 'global')) AS t $$,
  $$ VALUES (current_setting('t.child_global'), true) $$,
  'global scope: the same key under another parent is the same run');
SELECT set_config('t.grandchild', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/grandchild', '{}',
         pg_catalog.jsonb_build_object('parent_run_id', current_setting('t.child_run'))) AS t), true);
SELECT is((SELECT v.root_run_id COLLATE "default" FROM runops.get_run(current_setting('t.grandchild')) AS v),
          current_setting('t.parent'), 'a grandchild''s root is the root of its parent');
SELECT is((SELECT runops.classify_residency(t.run_id) FROM runops.trigger_run(current_setting('t.env'), 'pgtap/child', '{}',
             pg_catalog.jsonb_build_object('parent_run_id', current_setting('t.parent'))) AS t),
          current_setting('t.residency'), 'a child inherits its parent''s residency');

-- Key expiry: expires_at <= runops.now() is expired; a dead key is released and a new run made.
SET LOCAL runops.fake_now = '2031-03-01 00:00:00+00';
SELECT set_config('t.ttl_run', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/ttl', '{}',
         '{"idempotency_key": "ttl-key", "idempotency_key_ttl": "1h"}') AS t), true);
SELECT is((SELECT v.idempotency_key_expires_at FROM runops.get_run(current_setting('t.ttl_run')) AS v),
          '2031-03-01 01:00:00+00'::timestamptz, 'idempotency_key_ttl sets the expiry from runops.now()');
SET LOCAL runops.fake_now = '2031-03-01 00:59:59+00';
SELECT results_eq(
  $$ SELECT t.run_id, t.is_cached FROM runops.trigger_run(current_setting('t.env'), 'pgtap/ttl', '{}', '{"idempotency_key": "ttl-key"}') AS t $$,
  $$ VALUES (current_setting('t.ttl_run'), true) $$,
  'a key one second before its expiry still dedups');
SET LOCAL runops.fake_now = '2031-03-01 01:00:00+00';
CREATE TEMP TABLE ttl_new ON COMMIT DROP AS
  SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/ttl', '{}', '{"idempotency_key": "ttl-key"}');
SELECT is((SELECT t.is_cached FROM ttl_new AS t), false, 'a key at its expiry (expires_at = now) is dead: a new run');
SELECT isnt((SELECT t.run_id FROM ttl_new AS t), current_setting('t.ttl_run'), '... with a new run_id');
SELECT is((SELECT r.idempotency_key_hash FROM runops.runs AS r WHERE 'run_' || r.id = current_setting('t.ttl_run')),
          NULL, 'the expired run no longer holds the key');
SELECT is((SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/ttl', '{}', '{"idempotency_key": "ttl-key"}') AS t),
          (SELECT t.run_id FROM ttl_new AS t), 'the new run holds the key now');

-- Dead keys by status: a run that ended badly releases its key; success and cancel keep it.
SELECT set_config('t.crashed', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "crash"}') AS t), true),
       set_config('t.succeeded', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "ok"}') AS t), true),
       set_config('t.canceled', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "cancel"}') AS t), true),
       set_config('t.expired', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "expire"}') AS t), true);
SELECT is((SELECT f.status FROM runops.finalize_run(current_setting('t.crashed'), 'CRASHED') AS f), 'CRASHED', 'finalize_run to CRASHED');
SELECT is((SELECT f.status FROM runops.finalize_run(current_setting('t.succeeded'), 'COMPLETED_SUCCESSFULLY', NULL, '{"out": 1}') AS f),
          'COMPLETED_SUCCESSFULLY', 'finalize_run to COMPLETED_SUCCESSFULLY');
SELECT is((SELECT f.status FROM runops.finalize_run(current_setting('t.canceled'), 'CANCELED') AS f), 'CANCELED', 'finalize_run to CANCELED');
SELECT is((SELECT f.status FROM runops.finalize_run(current_setting('t.expired'), 'EXPIRED') AS f), 'EXPIRED', 'finalize_run to EXPIRED');
SELECT results_eq(
  $$ SELECT t.run_id = current_setting('t.crashed'), t.is_cached, t.status
     FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "crash"}') AS t $$,
  $$ VALUES (false, false, 'PENDING'::text) $$, 'a CRASHED run''s key is dead: a new run');
SELECT results_eq(
  $$ SELECT t.run_id = current_setting('t.expired'), t.is_cached
     FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "expire"}') AS t $$,
  $$ VALUES (false, false) $$, 'an EXPIRED run''s key is dead: a new run');
SELECT results_eq(
  $$ SELECT t.run_id, t.is_cached, t.status
     FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "ok"}') AS t $$,
  $$ VALUES (current_setting('t.succeeded'), true, 'COMPLETED_SUCCESSFULLY'::text) $$,
  'a COMPLETED_SUCCESSFULLY run keeps its key: cached, with its status');
SELECT results_eq(
  $$ SELECT t.run_id, t.is_cached, t.status
     FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "cancel"}') AS t $$,
  $$ VALUES (current_setting('t.canceled'), true, 'CANCELED'::text) $$,
  'a CANCELED run keeps its key: cached');

-- reset_idempotency_key clears the key on this store's matching runs.
SELECT is(runops.reset_idempotency_key(current_setting('t.env'), 'pgtap/dead', 'ok'), 1, 'reset_idempotency_key clears one run');
SELECT is(runops.reset_idempotency_key(current_setting('t.env'), 'pgtap/dead', 'ok'), 0, '... and then none');
SELECT is((SELECT t.is_cached FROM runops.trigger_run(current_setting('t.env'), 'pgtap/dead', '{}', '{"idempotency_key": "ok"}') AS t),
          false, 'after a reset the key makes a new run');
SELECT is(runops.reset_idempotency_key(current_setting('t.env'), 'pgtap/child', 'ck', 'run', current_setting('t.parent')), 1,
          'reset_idempotency_key of a run-scoped key names the parent');
SELECT is(runops.reset_idempotency_key(current_setting('t.env'), 'pgtap/child', 'ck', 'attempt', current_setting('t.parent'), 2), 1,
          'reset_idempotency_key of an attempt-scoped key names the parent and attempt');

-- Pre-minted run ids (rule 1).
SELECT set_config('t.preminted', CASE current_setting('t.local_store') WHEN 'CONTROL_PLANE' THEN runops.generate_cuid()
                                                                          ELSE runops.generate_ksuid() END, true);
SELECT results_eq(
  $$ SELECT t.run_id, t.is_cached FROM runops.trigger_run(current_setting('t.env'), 'pgtap/pre', '{}',
       pg_catalog.jsonb_build_object('run_id', current_setting('t.preminted'))) AS t $$,
  $$ VALUES ('run_' || current_setting('t.preminted'), false) $$,
  'a pre-minted run_id is used as given');
SELECT results_eq(
  $$ SELECT t.run_id, t.is_cached FROM runops.trigger_run(current_setting('t.env'), 'pgtap/pre', '{}',
       pg_catalog.jsonb_build_object('run_id', 'run_' || current_setting('t.preminted'))) AS t $$,
  $$ VALUES ('run_' || current_setting('t.preminted'), true) $$,
  'retrying with the same pre-minted run_id (friendly form) returns it cached');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/other-task', '{}',
                      pg_catalog.jsonb_build_object('run_id', current_setting('t.preminted'))) $$,
                 'RO006', NULL, 'a pre-minted run_id naming another task''s run is RO006');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.env2'), 'pgtap/pre', '{}',
                      pg_catalog.jsonb_build_object('run_id', current_setting('t.preminted'))) $$,
                 'RO006', NULL, 'a pre-minted run_id naming another environment''s run is RO006');

-- finalize_run: one write; repeating it is idempotent; a final run never changes again (RO003).
SELECT set_config('t.fin', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/fin') AS t), true);
SET LOCAL runops.fake_now = '2031-04-01 00:00:00+00';
CREATE TEMP TABLE fin1 ON COMMIT DROP AS
  SELECT * FROM runops.finalize_run(current_setting('t.fin'), 'CRASHED', '{"message": "boom"}', NULL);
SELECT results_eq($$ SELECT f.status, f.error, f.completed_at, f.updated_at FROM fin1 AS f $$,
                  $$ VALUES ('CRASHED'::text, '{"message": "boom"}'::jsonb, '2031-04-01 00:00:00+00'::timestamptz,
                            '2031-04-01 00:00:00+00'::timestamptz) $$,
                  'finalize_run writes status, error and completed_at together, at runops.now()');
SET LOCAL runops.fake_now = '2031-04-02 00:00:00+00';
SELECT results_eq($$ SELECT * FROM runops.finalize_run(current_setting('t.fin'), 'CRASHED', '{"message": "boom"}', NULL) $$,
                  $$ SELECT * FROM fin1 $$,
                  'repeating the finalize_run that made the run final returns the row unchanged');
SELECT throws_ok($$ SELECT * FROM runops.finalize_run(current_setting('t.fin'), 'COMPLETED_SUCCESSFULLY') $$,
                 'RO003', NULL, 'finalize_run of a CRASHED run to COMPLETED_SUCCESSFULLY is RO003');
SELECT throws_ok($$ SELECT * FROM runops.finalize_run(current_setting('t.fin'), 'CANCELED') $$,
                 'RO003', NULL, 'finalize_run of a CRASHED run to CANCELED is RO003');
SELECT results_eq($$ SELECT * FROM runops.get_run(current_setting('t.fin')) $$, $$ SELECT * FROM fin1 $$,
                  'the refused transitions changed nothing');
SELECT throws_ok($$ UPDATE runops.runs SET status = 'PENDING' WHERE 'run_' || id = current_setting('t.fin') $$,
                 'RO003', NULL, 'even a direct UPDATE cannot move a final run (the guard trigger)');
SELECT throws_ok($$ UPDATE runops.runs SET status = 'BOGUS' WHERE 'run_' || id = (SELECT p.run_id FROM plain AS p) $$,
                 'RO003', NULL, 'a direct UPDATE to a status outside the table is RO003');
-- Delays, with the frozen clock.
SET LOCAL runops.fake_now = '2031-05-01 00:00:00+00';
SELECT set_config('t.delay_duration', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/delay', '{}',
                                                                               '{"delay": "10m"}') AS t), true),
       set_config('t.delay_timestamp', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/delay', '{}',
                                                                                '{"delay": "2031-05-02T00:00:00+02:00"}') AS t), true),
       set_config('t.ttl', (SELECT t.run_id FROM runops.trigger_run(current_setting('t.env'), 'pgtap/delay', '{}',
                                                                    '{"ttl": "2h"}') AS t), true);
SELECT results_eq(
  $$ SELECT v.status, v.delay_until, v.queued_at FROM runops.get_run(current_setting('t.delay_duration')) AS v $$,
  $$ VALUES ('DELAYED'::text, '2031-05-01 00:10:00+00'::timestamptz, NULL::timestamptz) $$,
  'a duration delay makes a DELAYED run due at runops.now() + delay');
SELECT results_eq(
  $$ SELECT v.status, v.delay_until FROM runops.get_run(current_setting('t.delay_timestamp')) AS v $$,
  $$ VALUES ('DELAYED'::text, '2031-05-01 22:00:00+00'::timestamptz) $$,
  'a timestamp delay with an offset is honoured');
SELECT is((SELECT t.status FROM runops.trigger_run(current_setting('t.env'), 'pgtap/delay', '{}', '{"delay": "2031-04-30T00:00:00Z"}') AS t),
          'PENDING', 'a delay in the past makes a PENDING run');
SELECT is((SELECT v.ttl FROM runops.get_run(current_setting('t.ttl')) AS v), interval '2 hours', 'ttl is stored as an interval');

-- The residency CHECK: no store can hold another store's or an unclassifiable id, even via SQL.
SELECT throws_ok(format($$ INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                                    payload, queue, created_at, updated_at)
                           VALUES (%L, 'e', 'p', 'o', 't', 'PENDING', '{}', 'q', now(), now()) $$, current_setting('t.other_id')),
                 '23514', NULL, 'inserting the other store''s id shape into runops.runs is a check_violation');
SELECT throws_ok($$ INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                             payload, queue, created_at, updated_at)
                    VALUES ('aWgEPTl1tmebfsQzFP4bxwgy80W', 'e', 'p', 'o', 't', 'PENDING', '{}', 'q', now(), now()) $$,
                 '23514', NULL, 'inserting an unclassifiable id into runops.runs is a check_violation');
SELECT throws_ok($$ INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                             payload, queue, created_at, updated_at)
                    VALUES ('run_' || current_setting('t.local_id'), 'e', 'p', 'o', 't', 'PENDING', '{}', 'q', now(), now()) $$,
                 '23514', NULL, 'ids are stored bare: a friendly id in runops.runs is a check_violation');
SELECT lives_ok(format($$ INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                                   payload, queue, created_at, updated_at)
                          VALUES (%L, 'e', 'p', 'o', 't', 'PENDING', '{}', 'q', now(), now()) $$, current_setting('t.local_id')),
                'this store''s own id shape is accepted');
SELECT throws_ok(format($$ INSERT INTO runops.batches (id, environment_id, status, expected_count, seal_timeout, created_at, updated_at)
                           VALUES (%L, 'e', 'PENDING', 1, '10m', now(), now()) $$, current_setting('t.other_id')),
                 '23514', NULL, 'runops.batches checks the residency of its ids');
SELECT throws_ok(format($$ INSERT INTO runops.waitpoints (id, environment_id, type, status, created_at)
                           VALUES (%L, 'e', 'MANUAL', 'PENDING', now()) $$, current_setting('t.other_id')),
                 '23514', NULL, 'runops.waitpoints checks the residency of its ids');

SELECT * FROM finish();
ROLLBACK;
