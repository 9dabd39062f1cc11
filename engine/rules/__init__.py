"""Rule files: YAML with positions, the rule schema, loading, overrides, static checks, inline tests."""
