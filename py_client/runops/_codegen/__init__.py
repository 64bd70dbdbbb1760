"""Tools that write generated source (not imported by the client)."""
