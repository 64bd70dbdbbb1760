"""Every statement the clients send, by name: one call of one public SQL function each.

:class:`runops.RunOps` and :class:`runops.AsyncRunOps` both run these and build no SQL of their
own, so "what does the client ask the database?" is this file (Procrastinate's ``queries.sql``
is the model). Parameters are named (``%(e)s``: environment id, ``%(r)s``: run id, ``%(o)s``:
the options as jsonb, ``%(env)s``: the environment guard — RO004 for another environment's
object). The functions themselves, and what they decide, are in ``sql/functions/``.
"""

from __future__ import annotations

from psycopg import sql

# -- the stores -----------------------------------------------------------------------------------

STORE_IDENTITY = "SELECT * FROM runops.store_identity()"
STORE_ROLE = "SELECT runops.store_role()"
# The store's revision (r0005_hardening, ...); a client refuses a store older than it needs.
STORE_VERSION = "SELECT runops.store_version()"
# With shards (docs/scale-out.md): what each store says of the shards, asked when first reached;
# an environment's shard (control plane, or any shard's mirror); a root trigger's route and its
# environment's shard in one round trip.
SHARD_CONFIG = "SELECT shard_number, shard_count, shard_ids_since FROM runops.shard_config()"
ENVIRONMENT_SHARD = "SELECT runops.environment_shard(%(e)s)"
TRIGGER_ROUTE_AND_SHARD = "SELECT runops.trigger_route(%(e)s, %(o)s), runops.environment_shard(%(e)s)"

# -- tenants (control plane) ----------------------------------------------------------------------

CREATE_ORGANIZATION = "SELECT runops.create_organization(%(slug)s, %(o)s)"
CREATE_PROJECT = "SELECT runops.create_project(%(org)s, %(slug)s)"
CREATE_ENVIRONMENT = "SELECT runops.create_environment(%(p)s, %(s)s, %(t)s)"
LIST_ENVIRONMENTS = "SELECT * FROM runops.list_environments(%(o)s)"
UPDATE_ENVIRONMENT = "SELECT runops.update_environment(%(e)s, %(c)s)"

# -- split control (control plane) and the tenant mirror (run-ops) --------------------------------

SPLIT_STATUS = "SELECT runops.split_status()"
ENABLE_SPLIT = "SELECT runops.enable_split()"
DISABLE_SPLIT = "SELECT runops.disable_split()"
SET_MINT_KIND = "SELECT runops.set_mint_kind(%(o)s, %(k)s)"
SET_DEFAULT_MINT_KIND = "SELECT runops.set_default_mint_kind(%(k)s)"
# Equal on both stores once the mirror holds what the control plane holds.
MIRROR_FINGERPRINT = "SELECT runops.mirror_fingerprint()"
PULL_TENANT_MIRROR = "SELECT runops.pull_tenant_mirror()"

# -- triggering -----------------------------------------------------------------------------------

# The store a root trigger of the environment belongs in (asked of the control plane, or of the
# run-ops store's mirror while the control plane does not answer).
TRIGGER_ROUTE = "SELECT runops.trigger_route(%(e)s, %(o)s)"
TRIGGER_RUN = "SELECT * FROM runops.trigger_run(%(e)s, %(t)s, %(p)s, %(o)s)"
TRIGGER_FAILED_TASK = "SELECT * FROM runops.trigger_failed_task(%(e)s, %(t)s, %(p)s, %(x)s, %(o)s)"
REPLAY_RUN = "SELECT * FROM runops.replay_run(%(r)s, %(o)s)"
RESET_IDEMPOTENCY_KEY = "SELECT runops.reset_idempotency_key(%(e)s, %(t)s, %(k)s, %(s)s, %(p)s, %(a)s)"

# -- reads ----------------------------------------------------------------------------------------

GET_RUN = "SELECT * FROM runops.get_run(%(r)s, %(e)s)"
GET_BATCH = "SELECT * FROM runops.get_batch(%(b)s, %(e)s)"
GET_WAITPOINT = "SELECT * FROM runops.get_waitpoint(%(w)s, %(e)s)"
# This store's keyset page; the client merges both stores' pages as SQL list_runs does.
LIST_STORE_RUNS = "SELECT * FROM runops.list_store_runs(%(e)s, %(n)s, %(c)s, %(f)s)"

# -- one run, on the store that owns it -----------------------------------------------------------

FINALIZE_RUN = "SELECT * FROM runops.finalize_run(%(r)s, %(s)s, %(e)s, %(o)s, %(env)s)"
DEQUEUE_RUNS = "SELECT * FROM runops.dequeue_runs(%(e)s, %(w)s, %(n)s, %(o)s)"
HEARTBEAT_RUN = "SELECT * FROM runops.heartbeat_run(%(r)s, %(w)s, %(env)s)"
START_ATTEMPT = "SELECT * FROM runops.start_attempt(%(r)s, %(w)s, %(env)s)"
COMPLETE_ATTEMPT = "SELECT * FROM runops.complete_attempt(%(r)s, %(n)s, %(o)s, %(env)s)"
FAIL_ATTEMPT = "SELECT * FROM runops.fail_attempt(%(r)s, %(n)s, %(x)s, %(t)s, %(env)s)"
CREATE_CHECKPOINT = "SELECT * FROM runops.create_checkpoint(%(r)s, %(n)s, %(c)s, %(l)s, %(m)s, %(env)s)"
RESUME_RUN = "SELECT * FROM runops.resume_run(%(r)s, %(env)s)"
CANCEL_RUN = "SELECT * FROM runops.cancel_run(%(r)s, %(c)s, %(env)s)"
# '{}': block_run's options (none from the client).
BLOCK_RUN = "SELECT * FROM runops.block_run(%(r)s, %(w)s, '{}', %(env)s)"

# -- waitpoints -----------------------------------------------------------------------------------

CREATE_WAITPOINT = "SELECT * FROM runops.create_waitpoint(%(e)s, %(t)s, %(o)s)"
COMPLETE_WAITPOINT = "SELECT * FROM runops.complete_waitpoint(%(w)s, %(o)s, %(x)s, %(env)s)"

# -- batches --------------------------------------------------------------------------------------

BATCH_TRIGGER = "SELECT * FROM runops.batch_trigger(%(e)s, %(i)s, %(o)s)"
CREATE_BATCH = "SELECT * FROM runops.create_batch(%(e)s, %(n)s, %(o)s)"
APPEND_BATCH_ITEMS = "SELECT * FROM runops.append_batch_items(%(b)s, %(s)s, %(i)s, %(env)s)"
SEAL_BATCH = "SELECT * FROM runops.seal_batch(%(b)s, %(env)s)"
RESUME_BATCH_RUN = "SELECT * FROM runops.resume_batch_run(%(b)s, %(env)s)"

# -- services, run on every store -----------------------------------------------------------------

METRICS = "SELECT runops.metrics(%(e)s)"
TICK = "SELECT runops.tick(%(n)s)"
TICK_WHEN_DUE = "SELECT runops.tick_when_due(%(i)s, %(n)s)"
ENQUEUE_DELAYED_RUNS = "SELECT runops.enqueue_delayed_runs(%(n)s)"
EXPIRE_ENQUEUED_RUNS = "SELECT runops.expire_enqueued_runs(%(n)s)"
CANCEL_DEV_SESSION_RUNS = "SELECT runops.cancel_dev_session_runs(%(e)s, %(d)s)"
EXECUTE_TASKS_WAITING_FOR_DEPLOY = "SELECT runops.execute_tasks_waiting_for_deploy(%(e)s, %(t)s)"
PURGE_RUNS = "SELECT runops.purge_runs(%(o)s, %(n)s)"

# -- alerts: channels on the control plane, the outbox on every store ------------------------------

CREATE_ALERT_CHANNEL = "SELECT runops.create_alert_channel(%(e)s, %(k)s, %(t)s, %(o)s)"
DELETE_ALERT_CHANNEL = "SELECT * FROM runops.delete_alert_channel(%(c)s)"
CLAIM_ALERTS = "SELECT * FROM runops.claim_alerts(%(w)s, %(n)s, %(o)s)"
COMPLETE_ALERT = "SELECT * FROM runops.complete_alert(%(a)s, %(w)s)"
FAIL_ALERT = "SELECT * FROM runops.fail_alert(%(a)s, %(w)s, %(x)s)"

# -- notifications --------------------------------------------------------------------------------


def listen(environment_id: str, channel: str | None = None) -> sql.Composed:
    """LISTEN to an environment's status changes (the channel ``runops_env_<id>`` the status
    guard notifies), or to ``channel``, quoted as an identifier."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel or f"runops_env_{environment_id}"))

# -- bulk actions (the action's home is the control plane; advance runs on every store) ----------

CREATE_BULK_ACTION = "SELECT * FROM runops.create_bulk_action(%(e)s, %(k)s, %(f)s, %(o)s)"
GET_BULK_ACTION = "SELECT * FROM runops.get_bulk_action(%(b)s, %(e)s)"
ABORT_BULK_ACTION = "SELECT * FROM runops.abort_bulk_action(%(b)s)"
ADVANCE_BULK_ACTIONS = "SELECT runops.advance_bulk_actions(%(n)s)"
