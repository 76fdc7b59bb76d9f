"""Keeping bytes: the memory and disk tiers, the tiered store over them (`storage.tiers`), the cache
server that shares one store with every instance (`storage.server`) and its client (`storage.client`).

Knows chunks as opaque payloads under keys; nothing here imports vLLM.
"""
