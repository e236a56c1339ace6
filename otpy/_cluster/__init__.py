"""The cluster layer: otpy nodes on NATS.

Rule of this folder: the wire is NATS, spoken by ``nats_client`` (a trio transport over
the sans-io codec ``otpy._protocol.nats``); ``jetstream`` adds JetStream's KV and object
store over that client; ``server`` finds, starts and shares the real ``nats-server``.
Nothing here reaches into the core's private state: the cluster delivers through the
core's one call path, as every transport does. Each module could be its own package:
``nats_client`` and ``jetstream`` know nothing of otpy's servers, and the errors they
raise are their own (module-local, not in ``otpy._exceptions``) until the cluster layer
turns them into otpy's.
"""
