"""The vLLM side of pdrun: chunk keys, the paged-KV codec, the KV connector, and (pd/proxy) the proxy.

Import `pdrun.pd.connector` only inside vLLM processes: it is the one module here that imports vLLM.
"""
