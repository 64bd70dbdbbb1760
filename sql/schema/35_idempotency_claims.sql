-- The idempotency claim ledger (SPEC §6): one row per (environment, task, dedup key) naming the
-- run that holds the key, in whichever store. It arbitrates between the two stores; each
-- store's unique index on runs arbitrates inside it.
--
-- Its home is the run-ops store: NEW keyed triggers claim there in the same transaction as the
-- run, control-plane keyed triggers write it through the FDW (the one cross-store write). The
-- table exists on the control plane too, with the same shape, and stays empty there.
--
-- A claim is only as good as its holder: a claim is *live* while the run it names exists in its
-- store, still carries this dedup key and the key is not dead (expired, or the run ended badly);
-- otherwise a trigger takes the claim over with a compare-and-swap on run_id. Because
-- postgres_fdw has no two-phase commit, a claim written by the control plane can name a run
-- whose transaction never committed: claimant_xid lets a reader tell "still committing" from
-- "gone" (docs/idempotency-across-stores.md).
CREATE TABLE runops.idempotency_claims (
  environment_id  text COLLATE "C" NOT NULL,
  task_identifier text NOT NULL,
  key_hash        text COLLATE "C" NOT NULL,
  run_id          text COLLATE "C" NOT NULL,   -- the holder, bare; either shape
  claimant_xid    bigint,                      -- control-plane transaction (xid8) that wrote a LEGACY holder; NULL for NEW holders
  expires_at      timestamptz NOT NULL,        -- the holder's key expiry: past it the claim is dead and may be pruned
  claimed_at      timestamptz NOT NULL,
  PRIMARY KEY (environment_id, task_identifier, key_hash)
);
CREATE INDEX idempotency_claims_expiry_idx ON runops.idempotency_claims (expires_at);
ALTER TABLE runops.idempotency_claims OWNER TO runops_owner;
-- On the run-ops store the control plane's FDW login writes the ledger (and only reads the
-- run graph); on the control plane the run-ops store's login may only read it.
GRANT SELECT ON runops.idempotency_claims TO runops_fdw;
DO $$
BEGIN
  IF 'RESIDENCY_OF_THIS_STORE' = 'NEW' THEN
    GRANT INSERT, UPDATE ON runops.idempotency_claims TO runops_fdw;
  END IF;
END
$$;
