-- Minting ids in this store's shape (SPEC §2): KSUIDs on run-ops, cuids on the control plane.
--
--   generate_ksuid / generate_cuid  public: one bare id of either shape
--   ksuid_timestamp                 public: when a KSUID was minted
--   mint_id                         one fresh id of this store's shape
--   mint_ids                        n ids for a batch chunk (one minted, a counter in its tail)
--   ksuid_encode, base62_digits*, base36_digits*   the encoders behind them
-- These are plain functions (no SECURITY DEFINER): they read nothing a caller may not see.

-- 20 raw bytes (4-byte big-endian seconds since 1 400 000 000, 16 random) to 27 base62 chars.
-- Two numeric divisions by 62^10 leave bigint-sized parts, so the digit loop stays in bigint.
CREATE OR REPLACE FUNCTION runops.ksuid_encode(raw bytea)
RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
  alphabet constant text := '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
  p10 constant bigint := 839299365868340224;   -- 62^10
  n numeric := 0::numeric;
  part bigint;
  encoded text := '';
BEGIN
  IF pg_catalog.length(raw) <> 20 THEN
    RAISE EXCEPTION 'a KSUID is 20 bytes, got %', pg_catalog.length(raw) USING ERRCODE = 'RO006';
  END IF;
  FOR i IN 0..4 LOOP
    n := n * 4294967296::numeric
         + ((pg_catalog.get_byte(raw, 4 * i)::bigint << 24)
            | (pg_catalog.get_byte(raw, 4 * i + 1)::bigint << 16)
            | (pg_catalog.get_byte(raw, 4 * i + 2)::bigint << 8)
            | pg_catalog.get_byte(raw, 4 * i + 3)::bigint)::numeric;
  END LOOP;
  FOR p IN 1..3 LOOP
    IF p < 3 THEN
      part := pg_catalog.mod(n, p10::numeric)::bigint;
      n := pg_catalog.div(n, p10::numeric);
    ELSE
      part := n::bigint;
    END IF;
    FOR i IN 1..(CASE WHEN p < 3 THEN 10 ELSE 7 END) LOOP
      encoded := pg_catalog.substr(alphabet, (part % 62)::integer + 1, 1) || encoded;
      part := part / 62;
    END LOOP;
  END LOOP;
  RETURN encoded;
END
$$;

-- Fixed-width base62 and base36 digits of a bigint. The four-digit forms are unrolled (one
-- expression, no loop); the wider ones are made of them. All inline into their callers.
CREATE OR REPLACE FUNCTION runops.base62_digits4(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (v / 238328 % 62)::integer + 1, 1)
      || pg_catalog.substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (v / 3844 % 62)::integer + 1, 1)
      || pg_catalog.substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (v / 62 % 62)::integer + 1, 1)
      || pg_catalog.substr('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz', (v % 62)::integer + 1, 1)
$$;

CREATE OR REPLACE FUNCTION runops.base62_digits7(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.right(runops.base62_digits4(v / 14776336), 3) || runops.base62_digits4(v % 14776336)  -- 62^4
$$;

CREATE OR REPLACE FUNCTION runops.base62_digits10(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.right(runops.base62_digits4(v / 218340105584896), 2)                          -- 62^8
      || runops.base62_digits4(v / 14776336 % 14776336) || runops.base62_digits4(v % 14776336)    -- 62^4
$$;

CREATE OR REPLACE FUNCTION runops.base36_digits4(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT pg_catalog.substr('0123456789abcdefghijklmnopqrstuvwxyz', (v / 46656 % 36)::integer + 1, 1)
      || pg_catalog.substr('0123456789abcdefghijklmnopqrstuvwxyz', (v / 1296 % 36)::integer + 1, 1)
      || pg_catalog.substr('0123456789abcdefghijklmnopqrstuvwxyz', (v / 36 % 36)::integer + 1, 1)
      || pg_catalog.substr('0123456789abcdefghijklmnopqrstuvwxyz', (v % 36)::integer + 1, 1)
$$;

CREATE OR REPLACE FUNCTION runops.base36_digits8(v bigint)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
  SELECT runops.base36_digits4(v / 1679616 % 1679616) || runops.base36_digits4(v % 1679616)       -- 36^4
$$;

-- A KSUID: 32-bit seconds since the KSUID epoch, then a 128-bit payload taken from the random
-- bytes of v4 UUIDs (core only: no pgcrypto; a v4 UUID fixes 6 of its 128 bits, so the payload
-- holds at least 122 random bits). The 160-bit number is cut into 7 + 10 + 10 base62 digits with
-- two numeric divisions; each part is a bigint, written out by an unrolled expression.
CREATE OR REPLACE FUNCTION runops.generate_ksuid()
RETURNS text
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
AS $$
DECLARE
  p10 constant numeric := 839299365868340224;   -- 62^10
  bytes bytea := pg_catalog.uuid_send(pg_catalog.gen_random_uuid()) || pg_catalog.uuid_send(pg_catalog.gen_random_uuid());
  n numeric;
  low bigint;
  middle bigint;
BEGIN
  -- The payload's first byte (raw byte 4) names this store's shard; the next is kept in 1..127 so
  -- that no counter appended to the id's first 23 characters (next_ksuid, mint_ids) can carry
  -- into or borrow from that byte (docs/scale-out.md, "Ids name their shard"). Byte 0 is stored
  -- with its top bit flipped: the signed-to-unsigned step below flips it back.
  bytes := pg_catalog.set_byte(pg_catalog.set_byte(bytes, 0, coalesce((SELECT c.shard_number FROM runops.store_config AS c), 0) # 128),
                               1, (pg_catalog.get_byte(bytes, 1) & 127) | 1);
  n := (pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()))::bigint - 1400000000)::numeric
         * 340282366920938463463374607431768211456                                     -- 2^128
       + (('x' || pg_catalog.encode(pg_catalog.substr(bytes, 1, 8), 'hex'))::bit(64)::bigint::numeric
          + 9223372036854775808) * 18446744073709551616                                -- high 64 bits
       + ('x' || pg_catalog.encode(pg_catalog.substr(bytes, 17, 8), 'hex'))::bit(64)::bigint::numeric
       + 9223372036854775808;                                                         -- low 64 bits
  low := pg_catalog.mod(n, p10)::bigint;
  n := pg_catalog.div(n, p10);
  middle := pg_catalog.mod(n, p10)::bigint;
  RETURN runops.base62_digits7(pg_catalog.div(n, p10)::bigint) || runops.base62_digits10(middle)
         || runops.base62_digits10(low);
END
$$;

-- cuid v1 layout: 'c' + ms timestamp (8) + counter (4) + fingerprint (4) + random (8), base36.
CREATE OR REPLACE FUNCTION runops.generate_cuid()
RETURNS text
LANGUAGE sql VOLATILE
AS $$
  SELECT 'c'
      || runops.base36_digits8((pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()) * 1000)::bigint)
      || runops.base36_digits4(pg_catalog.nextval('runops.cuid_counter'))
      || runops.base36_digits4((pg_catalog.pg_backend_pid() % 1296) * 1296
                               + abs(pg_catalog.hashtext(pg_catalog.current_database())) % 1296)
      || runops.base36_digits8(('x' || pg_catalog.encode(pg_catalog.substr(pg_catalog.uuid_send(pg_catalog.gen_random_uuid()), 1, 6), 'hex'))::bit(48)::bigint
                               % 2821109907456)
$$;

CREATE OR REPLACE FUNCTION runops.ksuid_timestamp(id text)
RETURNS timestamptz
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
DECLARE
  bare text := pg_catalog.regexp_replace(id, '^[a-z]+_', '');
  n numeric := 0::numeric;
  ch integer;
BEGIN
  IF runops.try_classify_residency(id) IS DISTINCT FROM 'NEW' THEN
    RAISE EXCEPTION 'not a KSUID: %', pg_catalog.quote_nullable(runops.input_prefix(id))
      USING ERRCODE = 'RO001', HINT = 'ksuid_timestamp reads the time out of 27-character KSUIDs only';
  END IF;
  FOR i IN 1..27 LOOP
    ch := pg_catalog.ascii(pg_catalog.substr(bare, i, 1));
    n := n * 62::numeric
         + (CASE WHEN ch <= 57 THEN ch - 48 WHEN ch <= 90 THEN ch - 55 ELSE ch - 61 END)::numeric;
  END LOOP;
  -- The top 32 of 160 bits are the seconds since the KSUID epoch.
  RETURN pg_catalog.to_timestamp((1400000000::numeric
         + pg_catalog.div(n, 340282366920938463463374607431768211456::numeric))::double precision);
END
$$;

-- One fresh id of this store's shape: the one choice of minter, for every writer (trigger_run's
-- fast path holds it in its query). Plain SQL, so it inlines: local_residency() is a constant,
-- and PostgreSQL folds the CASE to the one minter before it plans or prepares anything (the other
-- branch, never reached, costs nothing; an unfolded cuid branch cost 25 us per transaction).
CREATE OR REPLACE FUNCTION runops.mint_id()
RETURNS text
LANGUAGE sql VOLATILE
AS $$
  SELECT CASE WHEN runops.local_residency() = 'NEW' THEN runops.next_ksuid() ELSE runops.generate_cuid() END
$$;

-- The KSUID a new run gets: cheap per call, because a session keeps what it minted last.
-- generate_ksuid costs ~70 us at the top of a transaction (PL/pgSQL builds its ~30 expression
-- nodes again in every transaction), a quarter of a trigger. So once per second (and once per
-- 62^4 ids) a session mints a real KSUID and keeps its first 23 characters; each id then is that
-- prefix and 4 base62 digits of a counter that starts at a random offset. The ids stay
-- KSUID-shaped, time-ordered to the second, unique (sessions differ in ~100 random bits of the
-- prefix) and below the maximum; what they give up is that ids of one session and second are
-- neighbours, not independent draws (docs/decisions.md, "How much randomness an id keeps").
-- The state lives in a session setting: '<epoch second>:<prefix>:<next counter>'.
CREATE OR REPLACE FUNCTION runops.next_ksuid()
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  state text := pg_catalog.current_setting('runops.ksuid_state', true);
  second text := pg_catalog.floor(pg_catalog.date_part('epoch', pg_catalog.clock_timestamp()))::bigint::text;
  counter bigint;
BEGIN
  IF state IS NULL OR pg_catalog.split_part(state, ':', 1) <> second
     OR pg_catalog.split_part(state, ':', 3)::bigint >= 14776336 THEN                  -- 62^4
    -- A fresh prefix; the counter starts low enough to leave a million ids of room.
    state := second || ':' || pg_catalog.left(runops.generate_ksuid(), 23) || ':'
             || pg_catalog.floor(pg_catalog.random() * 13776336)::bigint;
  END IF;
  counter := pg_catalog.split_part(state, ':', 3)::bigint;
  PERFORM pg_catalog.set_config('runops.ksuid_state',
                                pg_catalog.left(state, pg_catalog.length(second) + 25) || (counter + 1), false);
  RETURN pg_catalog.substr(state, pg_catalog.length(second) + 2, 23) || runops.base62_digits4(counter);
END
$$;

-- n fresh ids of this store's shape, in ascending byte order, for one chunk of a batch.
-- Minting each id in PL/pgSQL costs ~15 us; instead one id is minted and its last four
-- characters replaced by a counter starting at a random offset: the ids keep the timestamp and
-- about 100 random bits of the minted one, stay unique, and cost one expression each.
CREATE OR REPLACE FUNCTION runops.mint_ids(n integer)
RETURNS text[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
  prefix text;
  base bigint;
  span bigint := CASE WHEN local_residency() = 'NEW' THEN 14776336 ELSE 1679616 END;  -- 62^4, 36^4
BEGIN
  IF n <= 0 THEN
    RETURN '{}'::text[];
  END IF;
  base := floor(random() * (span - n))::bigint;
  IF local_residency() = 'NEW' THEN
    prefix := left(generate_ksuid(), 23);
    RETURN ARRAY(SELECT prefix || base62_digits4(base + i) FROM generate_series(0, n - 1) AS i ORDER BY i);
  END IF;
  prefix := left(generate_cuid(), 21);
  RETURN ARRAY(SELECT prefix || base36_digits4(base + i) FROM generate_series(0, n - 1) AS i ORDER BY i);
END
$$;
