-- The shard check of an id is refuse_other_shard's own statements (sql/functions/shards.sql says
-- why): the inlined predicate it replaces is gone.
DROP FUNCTION IF EXISTS runops.shard_holds(text);
