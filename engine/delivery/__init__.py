"""Between mapping and Topsort: the durable spool, dispatch with retries, dead letters, the API key."""
