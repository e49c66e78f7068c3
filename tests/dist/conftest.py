"""Multi-rank tests: ranks run as processes (dist_harness.py), each test bounded by a deadline
and by pytest-timeout."""
