"""Loading and validating sites.yaml, dispatching jobs, the beat that fires schedules."""
