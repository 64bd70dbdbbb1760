-- The clock: every time comparison reads runops.now(), which tests freeze with the session setting
-- runops.fake_now (SPEC §3).

-- The one clock. runops.fake_now freezes it for tests, but only for members of runops_clock:
-- anyone else setting it is ignored rather than obeyed.
CREATE OR REPLACE FUNCTION runops.now()
RETURNS timestamptz
LANGUAGE plpgsql STABLE
AS $$
DECLARE
  fake text := pg_catalog.current_setting('runops.fake_now', true);
BEGIN
  IF fake IS NULL OR fake = '' THEN
    RETURN pg_catalog.now();
  END IF;
  IF NOT pg_catalog.pg_has_role(session_user, 'runops_clock', 'MEMBER') THEN
    RETURN pg_catalog.now();
  END IF;
  RETURN fake::timestamptz;
END
$$;
