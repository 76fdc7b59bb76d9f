"""Keeping bytes: memory tier, disk tier, tiered store, cache server and client (issue 4)."""
