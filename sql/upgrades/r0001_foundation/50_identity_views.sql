-- r0001 as released: sql/fdw/00_identity_views.sql, verbatim.
-- What each store shows the other through postgres_fdw about itself. A foreign table cannot
-- call a remote function, but it can read a remote view that does.
--
--   store_identity_view  who I am
--   peer_identity_view   who my FDW reaches (so the control plane can check that the run-ops
--                        store's FDW points back at it: both directions must agree)
CREATE VIEW runops.store_identity_view AS SELECT * FROM runops.store_identity();
CREATE VIEW runops.peer_identity_view AS SELECT * FROM runops.peer_identity();
ALTER VIEW runops.store_identity_view OWNER TO runops_owner;
ALTER VIEW runops.peer_identity_view OWNER TO runops_owner;
GRANT SELECT ON runops.store_identity_view, runops.peer_identity_view TO runops_fdw;
