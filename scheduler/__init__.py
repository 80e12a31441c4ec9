"""Loading and validating sites.yaml, dispatching jobs (later: the beat schedule)."""
