-- Residency is a pure function of the id's shape (SPEC §2), the same in both stores; the
-- identity functions of SPEC §4.
BEGIN;
SET LOCAL search_path = tap, public;
SELECT plan(46);

-- Known shapes.
SELECT is(runops.classify_residency('cjld2cjxh0000qzrmn831i7rn'), 'LEGACY', 'a bare 25-character cuid is LEGACY');
SELECT is(runops.classify_residency('0ujtsYcgvSTl8PAuAdqWYSMnLOv'), 'NEW', 'a bare KSUID (Segment''s reference vector) is NEW');
SELECT is(runops.classify_residency('aWgEPTl1tmebfsQzFP4bxwgy80V'), 'NEW', 'the largest KSUID is NEW');
SELECT is(runops.classify_residency('000000000000000000000000000'), 'NEW', 'the smallest KSUID is NEW');
SELECT is(runops.try_classify_residency('aWgEPTl1tmebfsQzFP4bxwgy80W'), NULL, 'one past the largest KSUID is unclassifiable');
SELECT is(runops.try_classify_residency('zzzzzzzzzzzzzzzzzzzzzzzzzzz'), NULL, '27 base62 characters above the KSUID range are unclassifiable');

-- Friendly prefixes: ^[a-z]+_, only the first one stripped.
SELECT is(runops.classify_residency('run_cjld2cjxh0000qzrmn831i7rn'), 'LEGACY', 'run_ + cuid is LEGACY');
SELECT is(runops.classify_residency('batch_cjld2cjxh0000qzrmn831i7rn'), 'LEGACY', 'batch_ + cuid is LEGACY');
SELECT is(runops.classify_residency('waitpoint_0ujtsYcgvSTl8PAuAdqWYSMnLOv'), 'NEW', 'waitpoint_ + KSUID is NEW');
SELECT is(runops.classify_residency('attempt_0ujtsYcgvSTl8PAuAdqWYSMnLOv'), 'NEW', 'attempt_ + KSUID is NEW');
SELECT is(runops.classify_residency('checkpoint_0ujtsYcgvSTl8PAuAdqWYSMnLOv'), 'NEW', 'checkpoint_ + KSUID is NEW');
SELECT is(runops.classify_residency('run_0ujtsYcgvSTl8PAuAdqWYSMnLOv'), 'NEW', 'run_ + KSUID is NEW');
SELECT is(runops.try_classify_residency('run_run_cjld2cjxh0000qzrmn831i7rn'), NULL, 'only the first friendly prefix is stripped');
SELECT is(runops.try_classify_residency('Run_cjld2cjxh0000qzrmn831i7rn'), NULL, 'an upper-case prefix is not a friendly prefix');
SELECT is(runops.try_classify_residency('_cjld2cjxh0000qzrmn831i7rn'), NULL, 'an empty prefix is not a friendly prefix');
SELECT is(runops.try_classify_residency('run_aWgEPTl1tmebfsQzFP4bxwgy80W'), NULL, 'a prefix does not rescue an out-of-range KSUID');

-- Near misses.
SELECT is(runops.try_classify_residency('Cjld2cjxh0000qzrmn831i7rn'), NULL, 'a cuid starts with a lower-case c');
SELECT is(runops.try_classify_residency('cjld2cjxh0000qzrmn831i7r'), NULL, 'a 24-character cuid-like id is unclassifiable');
SELECT is(runops.try_classify_residency('cjld2cjxh0000qzrmn831i7rnx'), NULL, 'a 26-character cuid-like id is unclassifiable');
SELECT is(runops.try_classify_residency('cjld2cjxh0000qzrmn831I7rn'), NULL, 'a cuid has no upper-case letters');
SELECT is(runops.try_classify_residency(E'cjld2cjxh0000qzrmn831i7rn\n'), NULL, 'a trailing newline is not ignored');
SELECT is(runops.try_classify_residency('0ujtsYcgvSTl8PAuAdqWYSMnLO'), NULL, 'a 26-character KSUID-like id is unclassifiable');
SELECT is(runops.try_classify_residency('0ujtsYcgvSTl8PAuAdqWYSMnLO-'), NULL, 'a KSUID has only base62 characters');
SELECT is(runops.try_classify_residency(''), NULL, 'the empty string is unclassifiable');
SELECT is(runops.try_classify_residency('run_'), NULL, 'a bare prefix is unclassifiable');
SELECT is(runops.try_classify_residency(NULL), NULL, 'NULL is unclassifiable');

-- classify_residency raises RO001 where try_classify_residency answers NULL.
SELECT throws_ok($$ SELECT runops.classify_residency('aWgEPTl1tmebfsQzFP4bxwgy80W') $$, 'RO001', NULL,
                 'classify_residency raises RO001 for an out-of-range KSUID');
SELECT throws_ok($$ SELECT runops.classify_residency('not-an-id') $$, 'RO001', NULL,
                 'classify_residency raises RO001 for garbage');
SELECT throws_ok($$ SELECT runops.classify_residency('run_run_cjld2cjxh0000qzrmn831i7rn') $$, 'RO001', NULL,
                 'classify_residency raises RO001 for a doubled prefix');
SELECT throws_ok($$ SELECT runops.classify_residency(NULL) $$, 'RO001', NULL,
                 'classify_residency raises RO001 for NULL');
SELECT throws_ok($$ SELECT runops.classify_residency('') $$, 'RO001', NULL,
                 'classify_residency raises RO001 for the empty string');

-- Minting: shapes, and residency of what is minted.
SELECT is_empty($$ SELECT k FROM (SELECT runops.generate_ksuid() AS k FROM pg_catalog.generate_series(1, 500)) AS g
                   WHERE runops.try_classify_residency(k) IS DISTINCT FROM 'NEW' $$,
                'generate_ksuid mints NEW ids');
SELECT is_empty($$ SELECT c FROM (SELECT runops.generate_cuid() AS c FROM pg_catalog.generate_series(1, 500)) AS g
                   WHERE runops.try_classify_residency(c) IS DISTINCT FROM 'LEGACY' $$,
                'generate_cuid mints LEGACY ids');
SELECT is((SELECT pg_catalog.count(DISTINCT k)::integer FROM (SELECT runops.generate_ksuid() AS k FROM pg_catalog.generate_series(1, 1000)) AS g),
          1000, 'generate_ksuid mints distinct ids');
SELECT is((SELECT pg_catalog.count(DISTINCT c)::integer FROM (SELECT runops.generate_cuid() AS c FROM pg_catalog.generate_series(1, 1000)) AS g),
          1000, 'generate_cuid mints distinct ids');
SELECT ok(pg_catalog.abs(pg_catalog.date_part('epoch', runops.ksuid_timestamp(runops.generate_ksuid()) - pg_catalog.clock_timestamp())) < 2,
          'a fresh KSUID carries the current time');

-- KSUID encoding and timestamps (Segment's reference vector).
SELECT is(runops.ksuid_encode('\x0669F7EFB5A1CD34B5F99D1154FB6853345C9735'::bytea), '0ujtsYcgvSTl8PAuAdqWYSMnLOv',
          'ksuid_encode matches the reference vector');
SELECT is(runops.ksuid_timestamp('0ujtsYcgvSTl8PAuAdqWYSMnLOv'), '2017-10-10 04:00:47+00'::timestamptz,
          'ksuid_timestamp reads a bare KSUID');
SELECT is(runops.ksuid_timestamp('run_0ujtsYcgvSTl8PAuAdqWYSMnLOv'), '2017-10-10 04:00:47+00'::timestamptz,
          'ksuid_timestamp reads a friendly KSUID');
SELECT throws_ok($$ SELECT runops.ksuid_timestamp('cjld2cjxh0000qzrmn831i7rn') $$, 'RO001', NULL,
                 'ksuid_timestamp refuses a cuid with RO001');

-- Store identity.
SELECT ok(runops.store_role() IN ('CONTROL_PLANE', 'RUN_OPS'), 'store_role() names a store');
SELECT is((SELECT i.store_role FROM runops.store_identity() AS i), runops.store_role(),
          'store_identity() carries store_role()');
SELECT is((SELECT i.database_name FROM runops.store_identity() AS i), pg_catalog.current_database()::text,
          'store_identity() names this database');
SELECT is((SELECT pg_catalog.count(*)::integer FROM runops.store_identity()), 1, 'store_identity() returns one row');

-- The clock: runops.fake_now freezes runops.now() for a superuser session (a runops_clock member).
SET LOCAL runops.fake_now = '2031-02-03 04:05:06+00';
SELECT is(runops.now(), '2031-02-03 04:05:06+00'::timestamptz, 'runops.fake_now freezes runops.now()');
SET LOCAL runops.fake_now = '';
SELECT is(runops.now(), pg_catalog.now(), 'an empty runops.fake_now means the transaction time');

SELECT * FROM finish();
ROLLBACK;
