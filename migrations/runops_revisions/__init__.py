"""The one runner of the shared run-graph revisions: both histories' version files call it.

A revision is its frozen DDL delta, ``sql/upgrades/<revision>/*.sql``, read from the installed
package's SQL (``runops._sql`` in a wheel, ``sql/`` in a checkout). The live function files are
not part of any revision: ``env_common.py`` applies them once at head (runops.ops.schema).
"""

from collections.abc import Callable

from alembic import op

from runops.ops import schema


def steps(name: str, store: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """The upgrade() and downgrade() of revision ``name`` in ``store``'s history."""

    def upgrade() -> None:
        # The driver connection runs the text as one simple query: no parameter parsing of the
        # PL/pgSQL bodies, and the same transaction Alembic opened.
        op.get_bind().connection.driver_connection.execute(schema.revision_sql(name, store))

    def downgrade() -> None:
        if name != schema.revision_names()[0]:
            raise NotImplementedError(f"{name} is not reversible in place: restore the pre-upgrade backup, "
                                      "or install the older release into a fresh store")
        schema.drop_store(op.get_bind().connection.driver_connection, store)

    return upgrade, downgrade
