"""A local stand-in for Topsort's events endpoint."""
