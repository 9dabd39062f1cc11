"""The Topsort contract: the events v2 schema, fitting values to it, validation, request bodies."""
