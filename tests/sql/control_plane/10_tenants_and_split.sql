-- The control plane: tenants (SPEC §4 "Control plane"), split control and the split modes
-- (SPEC §2 "Minting", "Split modes"), and where triggers are refused with RO002 / RO006 / RO004.
BEGIN;
SET LOCAL search_path = tap, public;
\ir ../lib/helpers.sql
SELECT plan(69);

SELECT is(runops.store_role(), 'CONTROL_PLANE', 'this is the control plane');

-- Tenants, through the public API.
SELECT set_config('t.org', runops.create_organization('pgtap-org-' || pg_catalog.substr(pg_catalog.md5(pg_catalog.random()::text), 1, 10),
                                                      '{"title": "pgTAP", "mint_kind": "cuid"}'), true);
SELECT set_config('t.project', runops.create_project(current_setting('t.org'), 'proj'), true);
SELECT set_config('t.env', runops.create_environment(current_setting('t.project'), 'prod', 'PRODUCTION'), true);
SELECT is(runops.classify_residency(current_setting('t.org')), 'LEGACY', 'create_organization returns a cuid');
SELECT is(runops.classify_residency(current_setting('t.project')), 'LEGACY', 'create_project returns a cuid');
SELECT is(runops.classify_residency(current_setting('t.env')), 'LEGACY', 'create_environment returns a cuid');
SELECT results_eq(
  $$ SELECT o.title, o.mint_kind FROM runops.organizations AS o WHERE o.id = current_setting('t.org') $$,
  $$ VALUES ('pgTAP'::text, 'cuid'::text) $$, 'the organization keeps its title and mint kind');
SELECT results_eq(
  $$ SELECT e.project_id COLLATE "default", e.organization_id COLLATE "default", e.type, e.paused, e.archived
     FROM runops.runtime_environments AS e WHERE e.id = current_setting('t.env') $$,
  $$ VALUES (current_setting('t.project'), current_setting('t.org'), 'PRODUCTION'::text, false, false) $$,
  'the environment belongs to its project and organization, unpaused');
SELECT throws_ok($$ SELECT runops.create_organization('Bad Slug') $$, 'RO006', NULL, 'a bad organization slug is RO006');
SELECT throws_ok($$ SELECT runops.create_organization('pgtap-x', '{"colour": "red"}') $$, 'RO006', NULL,
                 'an unknown organization option is RO006');
SELECT throws_ok($$ SELECT runops.create_organization('pgtap-x', '{"mint_kind": "uuid"}') $$, 'RO006', NULL,
                 'an unknown mint kind is RO006');
SELECT throws_ok($$ SELECT runops.create_organization((SELECT o.slug FROM runops.organizations AS o WHERE o.id = current_setting('t.org'))) $$,
                 'RO006', NULL, 'a duplicate organization slug is RO006');
SELECT throws_ok($$ SELECT runops.create_project(runops.generate_cuid(), 'proj') $$, 'RO004', NULL,
                 'create_project in an unknown organization is RO004');
SELECT throws_ok($$ SELECT runops.create_project(current_setting('t.org'), 'proj') $$, 'RO006', NULL,
                 'a duplicate project slug is RO006');
SELECT throws_ok($$ SELECT runops.create_environment(current_setting('t.project'), 'dev', 'LOCAL') $$, 'RO006', NULL,
                 'an unknown environment type is RO006');
SELECT throws_ok($$ SELECT runops.create_environment(runops.generate_cuid(), 'dev', 'DEVELOPMENT') $$, 'RO004', NULL,
                 'create_environment in an unknown project is RO004');
SELECT throws_ok($$ SELECT runops.create_environment(current_setting('t.project'), 'prod', 'PRODUCTION') $$, 'RO006', NULL,
                 'a duplicate environment slug is RO006');

-- update_environment, and RO005 for a paused environment.
SELECT lives_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/task') $$, 'a fresh environment takes new work');
SELECT lives_ok($$ SELECT runops.update_environment(current_setting('t.env'), '{"paused": true}') $$, 'update_environment pauses');
SELECT is((SELECT e.paused FROM runops.runtime_environments AS e WHERE e.id = current_setting('t.env')), true, 'the environment is paused');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/task') $$, 'RO005', NULL,
                 'trigger_run in a paused environment is RO005');
SELECT lives_ok($$ SELECT runops.update_environment(current_setting('t.env'), '{"paused": false}') $$, 'update_environment unpauses');
SELECT lives_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/task') $$, 'an unpaused environment takes new work again');
SELECT throws_ok($$ SELECT runops.update_environment(current_setting('t.env'), '{"paused": true, "colour": "red"}') $$, 'RO006', NULL,
                 'an unknown change is RO006');
SELECT throws_ok($$ SELECT runops.update_environment(current_setting('t.env'), '{"paused": "yes"}') $$, 'RO006', NULL,
                 'a non-boolean paused is RO006');
SELECT throws_ok($$ SELECT runops.update_environment(current_setting('t.env'), '{"maximum_concurrency_limit": -1}') $$, 'RO006', NULL,
                 'a negative concurrency limit is RO006');
SELECT is((SELECT e.paused FROM runops.runtime_environments AS e WHERE e.id = current_setting('t.env')), false,
          'a refused update changed nothing');
SELECT throws_ok($$ SELECT runops.update_environment(runops.generate_cuid(), '{"paused": true}') $$, 'RO004', NULL,
                 'update_environment of an unknown environment is RO004');
SELECT lives_ok($$ SELECT runops.update_environment(current_setting('t.env'), '{"archived": true}') $$, 'update_environment archives');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.env'), 'pgtap/task') $$, 'RO005', NULL,
                 'trigger_run in an archived environment is RO005');

-- Split control. The test clusters are wired to distinct clusters, so enable_split accepts.
SELECT is((runops.enable_split() ->> 'enabled')::boolean, true, 'enable_split enables the split');
SELECT results_eq(
  $$ SELECT a.actor, a.verdict FROM runops.split_audit AS a WHERE a.action = 'enable_split' ORDER BY a.id DESC LIMIT 1 $$,
  $$ VALUES (session_user::text COLLATE "default", 'ACCEPTED'::text) $$, 'enable_split is audited with session_user and verdict');
SELECT ok(runops.split_status() ?& ARRAY['enabled', 'distinct', 'reason', 'control_plane', 'run_ops', 'default_mint_kind', 'org_mint_kinds'],
          'split_status() carries every key SPEC §4 names');
SELECT is(runops.split_status() -> 'distinct', 'true'::jsonb, 'split_status() sees a distinct run-ops store');
SELECT is(runops.split_status() #>> '{run_ops,store_role}', 'RUN_OPS', 'split_status() reports the run-ops store''s identity');

SELECT set_config('t.cuid_env', pg_temp.make_env('cuid'), true),
       set_config('t.ksuid_env', pg_temp.make_env('ksuid'), true),
       set_config('t.default_env', pg_temp.make_env(NULL), true),
       set_config('t.ksuid', runops.generate_ksuid(), true),
       set_config('t.cuid', runops.generate_cuid(), true);
SELECT is(runops.trigger_route(current_setting('t.cuid_env'), '{}'), 'CONTROL_PLANE', 'enabled: a cuid organization''s roots stay here');
SELECT is(runops.trigger_route(current_setting('t.ksuid_env'), '{}'), 'RUN_OPS', 'enabled: a ksuid organization''s roots go to run-ops');
SELECT is(runops.trigger_route(current_setting('t.default_env'), '{}'), 'CONTROL_PLANE', 'enabled: the default mint kind is cuid');

-- RO002 on the control plane once the split is enabled.
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                                pg_catalog.jsonb_build_object('run_id', current_setting('t.ksuid'))) $$),
          'RO002: owning_store=RUN_OPS', 'a pre-minted KSUID run_id (ksuid organization) is RO002 naming RUN_OPS');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task') $$),
          'RO002: owning_store=RUN_OPS', 'a root of a ksuid organization is RO002 naming RUN_OPS');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.cuid_env'), 'pgtap/task', '{}',
                                pg_catalog.jsonb_build_object('parent_run_id', 'run_' || current_setting('t.ksuid'))) $$),
          'RO002: owning_store=RUN_OPS', 'a NEW parent id is RO002 naming RUN_OPS');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.cuid_env'), 'pgtap/task', '{}',
                                pg_catalog.jsonb_build_object('batch_id', 'batch_' || current_setting('t.ksuid'), 'batch_index', 0)) $$),
          'RO002: owning_store=RUN_OPS', 'a NEW batch id is RO002 naming RUN_OPS');
SELECT is(runops.trigger_route(current_setting('t.cuid_env'), pg_catalog.jsonb_build_object('parent_run_id', 'run_' || current_setting('t.ksuid'))),
          'RUN_OPS', 'trigger_route sends a child of a NEW parent to run-ops');
-- Rule 1: a pre-minted id whose shape disagrees with rules 2-3 is RO006.
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.cuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('run_id', current_setting('t.ksuid'))) $$,
                 'RO006', NULL, 'a pre-minted KSUID for a cuid organization''s root is RO006');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('run_id', current_setting('t.cuid'))) $$,
                 'RO006', NULL, 'a pre-minted cuid for a ksuid organization''s root is RO006');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.cuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('run_id', current_setting('t.cuid'), 'parent_run_id', 'run_' || current_setting('t.ksuid'))) $$,
                 'RO006', NULL, 'a pre-minted cuid for a child of a NEW parent is RO006');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.finalize_run('run_' || current_setting('t.ksuid'), 'CANCELED') $$),
          'RO002: owning_store=RUN_OPS', 'finalize_run of a NEW id is RO002 naming RUN_OPS');

-- Mint kinds.
SELECT set_config('t.retried', runops.generate_cuid(), true);
SELECT results_eq(
  $$ SELECT t.run_id, t.is_cached FROM runops.trigger_run(current_setting('t.cuid_env'), 'pgtap/retry', '{}',
       pg_catalog.jsonb_build_object('run_id', current_setting('t.retried'))) AS t $$,
  $$ VALUES ('run_' || current_setting('t.retried'), false) $$, 'a pre-minted cuid for a cuid organization''s root');
SELECT lives_ok($$ SELECT runops.set_mint_kind((SELECT e.organization_id FROM runops.runtime_environments AS e
                                                WHERE e.id = current_setting('t.cuid_env')), 'ksuid') $$, 'set_mint_kind to ksuid');
SELECT is(runops.trigger_route(current_setting('t.cuid_env'), '{}'), 'RUN_OPS', 'the organization''s roots now go to run-ops');
-- SPEC §2 rule 1 ("a client retrying a trigger ... if it names an existing run of the same
-- environment and task, that run is returned with is_cached"), also across a mint-kind flip.
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.trigger_run(current_setting('t.cuid_env'), 'pgtap/retry', '{}',
                                pg_catalog.jsonb_build_object('run_id', current_setting('t.retried'))) $$),
          NULL, 'after a mint-kind flip, retrying an existing LEGACY run''s pre-minted id returns it (no error)');
SELECT ok(runops.split_status() -> 'org_mint_kinds' ? (SELECT e.organization_id FROM runops.runtime_environments AS e
                                                       WHERE e.id = current_setting('t.cuid_env')),
          'split_status() lists the organization''s mint kind');
SELECT lives_ok($$ SELECT runops.set_mint_kind((SELECT e.organization_id FROM runops.runtime_environments AS e
                                                WHERE e.id = current_setting('t.cuid_env')), 'default') $$, 'set_mint_kind to default');
SELECT is(runops.trigger_route(current_setting('t.cuid_env'), '{}'), 'CONTROL_PLANE', 'the organization follows the default again');
SELECT throws_ok($$ SELECT runops.set_mint_kind(current_setting('t.org'), 'uuid') $$, 'RO006', NULL, 'set_mint_kind to an unknown kind is RO006');
SELECT throws_ok($$ SELECT runops.set_mint_kind(runops.generate_cuid(), 'ksuid') $$, 'RO004', NULL, 'set_mint_kind of an unknown organization is RO004');
SELECT lives_ok($$ SELECT runops.set_default_mint_kind('ksuid') $$, 'set_default_mint_kind to ksuid');
SELECT is(runops.trigger_route(current_setting('t.default_env'), '{}'), 'RUN_OPS', 'an organization without a mint kind follows the default');
SELECT throws_ok($$ SELECT runops.set_default_mint_kind('default') $$, 'RO006', NULL, 'the default mint kind cannot be ''default''');
SELECT lives_ok($$ SELECT runops.set_default_mint_kind('cuid') $$, 'set_default_mint_kind back to cuid');

-- Disabled after being enabled: roots mint LEGACY, anchors still decide, NEW rows stay owned by run-ops.
SELECT is((runops.disable_split() ->> 'enabled')::boolean, false, 'disable_split disables the split');
SELECT results_eq(
  $$ SELECT t.is_cached, t.residency FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task') AS t $$,
  $$ VALUES (false, 'LEGACY'::text) $$, 'disabled: a ksuid organization''s root mints LEGACY here');
SELECT is(runops.trigger_route(current_setting('t.cuid_env'), pg_catalog.jsonb_build_object('parent_run_id', 'run_' || current_setting('t.ksuid'))),
          'RUN_OPS', 'disabled: a child of a NEW parent still goes to run-ops');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('run_id', current_setting('t.ksuid'))) $$,
                 'RO006', NULL, 'disabled: a pre-minted KSUID root is RO006');
SELECT is(pg_temp.error_of($$ SELECT * FROM runops.finalize_run('run_' || current_setting('t.ksuid'), 'CANCELED') $$),
          'RO002: owning_store=RUN_OPS', 'disabled: a NEW run is still written on run-ops (RO002 here)');

-- Never enabled: everything mints LEGACY, NEW ids read as absent, writes naming them are RO004,
-- a pre-minted NEW id is RO006.
SELECT pg_temp.set_split(false, false);
SELECT results_eq(
  $$ SELECT t.residency FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task') AS t $$,
  $$ VALUES ('LEGACY'::text) $$, 'never enabled: every root mints LEGACY');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.ksuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('run_id', current_setting('t.ksuid'))) $$,
                 'RO006', NULL, 'never enabled: a pre-minted NEW id is RO006');
SELECT throws_ok($$ SELECT * FROM runops.trigger_run(current_setting('t.cuid_env'), 'pgtap/task', '{}',
                      pg_catalog.jsonb_build_object('parent_run_id', 'run_' || current_setting('t.ksuid'))) $$,
                 'RO004', NULL, 'never enabled: a NEW parent is RO004');
SELECT throws_ok($$ SELECT * FROM runops.finalize_run('run_' || current_setting('t.ksuid'), 'CANCELED') $$,
                 'RO004', NULL, 'never enabled: finalize_run of a NEW id is RO004');
SELECT is_empty($$ SELECT * FROM runops.get_run('run_' || current_setting('t.ksuid')) $$, 'never enabled: a NEW id reads as absent');

-- The control plane's residency CHECK (SPEC §2, §8): a KSUID-shaped id cannot land here, even via SQL.
SELECT throws_ok($$ INSERT INTO runops.runs (id, environment_id, project_id, organization_id, task_identifier, status,
                                             payload, queue, created_at, updated_at)
                    VALUES ('0ujtsYcgvSTl8PAuAdqWYSMnLOv', 'e', 'p', 'o', 't', 'PENDING', '{}', 'q', now(), now()) $$,
                 '23514', NULL, 'inserting a KSUID into the control plane''s runops.runs is a check_violation');

SELECT * FROM finish();
ROLLBACK;
