-- Workers waiting for new work (SPEC §4 Notifications [1.3]: new work notifies idle workers,
-- and only when someone waits for it).
--
-- A worker LISTENs on a channel of its own and passes it to dequeue_runs (option `wake`); a
-- dequeue that hands out fewer runs than asked because the queue ran dry registers the channel
-- here until expires_at (every empty dequeue renews it). A run becoming PENDING in the
-- environment — a trigger, a batch, a delay or retry coming due, a resume, a lapsed lease —
-- takes one registration per new run (FOR UPDATE SKIP LOCKED) and notifies its channel, once:
-- the woken worker dequeues, and registers again if it finds nothing. So a trigger notifies only
-- while a worker is idle, wakes as many workers as there are runs (no herd), and a loaded system,
-- where every dequeue comes back full, has no registration and sends no notification (and takes
-- no part in the lock PostgreSQL holds on the notification queue through every notifying commit).
--
-- UNLOGGED: a registration is a hint a worker renews every few seconds, not data. Writing it
-- costs no WAL, so an empty dequeue still commits without waiting for a flush; a crash forgets
-- the registrations, and the workers' polling fallback registers them again.
CREATE UNLOGGED TABLE runops.waiting_workers (
  channel        text COLLATE "C" PRIMARY KEY,   -- what the worker LISTENs on
  environment_id text COLLATE "C" NOT NULL,
  queues         text[],                         -- the dequeue's filters (NULL: any)
  tasks          text[],
  expires_at     timestamptz NOT NULL
);
CREATE INDEX waiting_workers_environment_idx ON runops.waiting_workers (environment_id);
ALTER TABLE runops.waiting_workers OWNER TO runops_owner;
