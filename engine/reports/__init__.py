"""What rules make of traffic: summaries, diff, coverage, explain."""
