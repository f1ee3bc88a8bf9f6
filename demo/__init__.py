"""`make demo`: `python -m demo`."""
