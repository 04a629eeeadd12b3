"""Orchestration: one run, a sweep of runs. Owns the run directory, the key file and the records, and
calls down into runs/, audit/, training/ and privacy/ (never the other way)."""
