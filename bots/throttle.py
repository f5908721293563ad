"""Per-user request limit, kept in Redis so it holds across frontend restarts and instances."""

from __future__ import annotations

import redis.asyncio as aioredis

from base.keys import Keys


class UserRateLimit:
    """At most ``limit`` requests per user in a fixed window of ``window_s`` seconds."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, limit: int, window_s: int):
        self.redis = redis
        self.keys = keys
        self.limit = limit
        self.window_s = window_s

    async def allow(self, user: str) -> bool:
        if self.limit <= 0:
            return True
        key = self.keys.rate(user)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, self.window_s, nx=True)
            count, _ = await pipe.execute()
        return int(count) <= self.limit
