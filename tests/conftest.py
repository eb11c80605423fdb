import os

# Tests run Ray clusters on loopback only; token auth is on everywhere else (Ray's default).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see cluster/pipeline.py: spinning OpenMP pools starve each other
