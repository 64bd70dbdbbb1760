-- r0001's seed rows (released as the module's SEEDS, here as SQL): the store's role, and on the
-- control plane the split settings' one row (the mirror receives it by replication; seeding it
-- on run-ops would collide).
INSERT INTO runops.store_config (store_role)
VALUES (CASE 'RESIDENCY_OF_THIS_STORE' WHEN 'LEGACY' THEN 'CONTROL_PLANE' ELSE 'RUN_OPS' END);
DO $$
BEGIN
  IF 'RESIDENCY_OF_THIS_STORE' = 'LEGACY' THEN
    INSERT INTO runops.split_settings DEFAULT VALUES;
  END IF;
END
$$;
