"""Keeping bytes: the memory and disk tiers, the tiered store over them (`storage.tiers`), the
shared-memory arena the memory tier lives in (`storage.arena`), the cache server that shares one
store with every instance (`storage.server`), its network client (`storage.client`) and the
same-host channel through the arena (`storage.local`).

Knows chunks as opaque payloads under keys; nothing here imports vLLM.
"""
