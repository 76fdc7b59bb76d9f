"""The proxy: one OpenAI endpoint in front of prefillers and decoders, a service of its own beside
the KV connector (it never imports vLLM).

    app.py           the endpoint and each request's path (prefill, then decode)
    body.py          a request as read at the door: parsed, checked, whether a hand-off serves it
    continuation.py  the prefill's request and the decoder's continuation after its first token
    routing.py       which prefiller and decoder serve a request
    health.py        which backends are in rotation
    shortcut.py      prompts the cache tier holds skip the prefill hop
    timing.py        where each request's time went
    metrics.py       the proxy's /metrics
"""
