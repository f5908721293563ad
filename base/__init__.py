"""The base layer: settings, Redis keys, the queue protocol and client, the Redis connection,
metrics and logging. It imports nothing else of ours; every other package builds on it."""
