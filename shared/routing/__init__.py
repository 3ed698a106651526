"""The KV-aware router's pure core: which worker caches what, and where a request should go.

``index.KVIndex`` replays workers' KV events into a bounded block -> workers map,
``cost.choose_worker`` weighs cached prefix against load, and ``router.Router`` ties them
together. ``placement.place`` is the whole answer to one request for the NATS service that
wraps it: the decode worker and, when ``disagg.DisaggPolicy`` says a remote prefill pays, a
prefill worker. Nothing here does I/O or reads a clock.
"""
