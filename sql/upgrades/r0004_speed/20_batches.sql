-- r0004: batch membership in runs, no foreign keys to batches on the hot path
-- (SPEC §4 and §5 [1.2]; docs/decisions.md "Batches").
--
-- A run a batch created is a member through its own runs.batch_id/batch_index; batch_items keeps
-- only cached items (an index resolved to a run not created for it). The foreign keys
-- runs.batch_id -> batches and batch_items.batch_id -> batches go: the functions keep those
-- invariants, `runops doctor --deep` checks them.
--
-- Locks: dropping a foreign key takes ACCESS EXCLUSIVE on both its tables, and the index build
-- and the move below need runs and batch_items still. All three are taken at once, 200 ms at a
-- time with a retry (as r0002 and r0003 do), so the upgrade never queues every trigger behind a
-- lock it is itself waiting for; a batch writer holds runs, batches and batch_items together, so
-- taking them one by one could deadlock with it.
--
-- Released with the lock-with-retry block written out here; since the switch to frozen deltas
-- the upgrade takes the tables named below (and those of every other pending revision) in one
-- such block before any revision runs: runops.ops.schema.take_upgrade_locks, its one home.
-- lock: runops.runs, runops.batches, runops.batch_items

ALTER TABLE runops.runs DROP CONSTRAINT runs_batch_id_fkey;
ALTER TABLE runops.batch_items DROP CONSTRAINT batch_items_batch_id_fkey;

-- Unique: every writer fills an index under the batch's row lock, after reading the index's
-- members, so no store can hold two created runs at one index (a violation here means the
-- store was already inconsistent, and the upgrade stops with it).
CREATE UNIQUE INDEX runs_batch_member_idx ON runops.runs (batch_id, batch_index) WHERE batch_id IS NOT NULL;

-- Every run with a batch_id was written with its batch_index and attached at that index in the
-- same transaction (admit_run, add_batch_items), so each has a batch_items row naming it at its
-- own index. Checked rather than assumed: a run naming a batch without such a row would become
-- a member it was not, so the upgrade refuses instead.
DO $$
DECLARE
  strays bigint;
BEGIN
  SELECT count(*) INTO strays FROM runops.runs AS r
  WHERE r.batch_id IS NOT NULL
    AND NOT EXISTS (SELECT FROM runops.batch_items AS i
                    WHERE i.batch_id = r.batch_id AND i.item_index = r.batch_index AND i.run_id = r.id);
  IF strays > 0 THEN
    RAISE EXCEPTION 'r0004: % runs name a batch without being its item at their batch_index; nothing was changed', strays
      USING HINT = 'SELECT id, batch_id, batch_index FROM runops.runs lists them; ask the runops maintainers before upgrading';
  END IF;
END
$$;

-- Move the created runs' membership out: their batch_items rows say again what the run row
-- says. What remains are cached items only, the one rule the functions read.
DELETE FROM runops.batch_items AS i
USING runops.runs AS r
WHERE r.id = i.run_id AND r.batch_id = i.batch_id AND r.batch_index = i.item_index;
