"""Benchmarks of segment-topsort: ``python -m benchmarks`` (engine throughput, RSS, rule load time)."""
