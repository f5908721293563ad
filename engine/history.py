"""Conversation history in Redis: a capped list of JSON turns per conversation, with a TTL.

Every key written about a user is also recorded in that user's key set, so /forget can
remove all of it.
"""

from __future__ import annotations

import json
import time

import redis.asyncio as aioredis

from base.keys import Keys
from persona.prompt import Turn


class HistoryStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, max_turns: int = 20, ttl_s: int = 604800):
        self.redis = redis
        self.keys = keys
        self.max_turns = max_turns
        self.ttl_s = ttl_s

    async def load(self, conversation: str) -> list[Turn]:
        raw = await self.redis.lrange(self.keys.history(conversation), 0, -1)
        turns = []
        for item in raw:
            data = json.loads(item)
            turns.append(Turn(data["role"], data["content"], data.get("speaker", "")))
        return turns

    def append_commands(self, pipe: aioredis.client.Pipeline, conversation: str, user: str,
                        speaker: str, user_text: str, reply: str) -> None:
        """Queue the commands that store one exchange on ``pipe`` (part of the reply MULTI)."""
        key = self.keys.history(conversation)
        pipe.rpush(
            key,
            json.dumps({"role": "user", "content": user_text, "speaker": speaker, "user": user}),
            json.dumps({"role": "assistant", "content": reply}),
        )
        pipe.ltrim(key, -2 * self.max_turns, -1)
        pipe.expire(key, self.ttl_s)
        self.remember_key_commands(pipe, user, key)

    def remember_key_commands(self, pipe: aioredis.client.Pipeline, user: str, key: str) -> None:
        index = self.keys.user_keys(user)
        pipe.sadd(index, key)
        pipe.expire(index, self.ttl_s)

    async def recent_canon(self, conversation: str) -> set[int]:
        """The canon lines (rows) this conversation heard within the repeat window."""
        return {int(m) for m in await self.redis.zrange(self.keys.canon_recent(conversation),
                                                        0, -1)}

    def canon_commands(self, pipe: aioredis.client.Pipeline, conversation: str, user: str,
                       row: int, window: int) -> None:
        """Queue: remember that ``row`` was said here; keep the last ``window`` lines."""
        key = self.keys.canon_recent(conversation)
        pipe.zadd(key, {str(row): time.time()})
        pipe.zremrangebyrank(key, 0, -window - 1)
        pipe.expire(key, self.ttl_s)
        self.remember_key_commands(pipe, user, key)

    async def drop_last_exchange(self, conversation: str, user: str | None = None
                                 ) -> tuple[str, str] | None:
        """Remove the last user/assistant pair (for /retry); returns (user text, speaker).
        With ``user``, only when that user wrote it (in a shared group, /retry redoes your
        own last exchange, never someone else's)."""
        key = self.keys.history(conversation)
        tail = await self.redis.lrange(key, -2, -1)
        if len(tail) != 2:
            return None
        user_turn = json.loads(tail[0])
        if user_turn.get("role") != "user":
            return None
        if user is not None and user_turn.get("user", user) != user:
            return None
        await self.redis.ltrim(key, 0, -3)
        return user_turn["content"], user_turn.get("speaker", "")

    async def reset(self, conversation: str) -> None:
        await self.redis.delete(self.keys.history(conversation),
                                self.keys.last_request(conversation))

    async def remove_turns_of(self, conversation: str, user: str) -> None:
        """A user's own turns (and House's answers to them) out of one conversation: /reset
        by a member of a shared group who is no admin."""
        await self._remove_user_turns(self.keys.history(conversation), user)

    async def forget(self, user: str) -> int:
        """Delete everything stored about ``user``; shared histories lose only their turns.

        Returns how many keys were deleted or rewritten.
        """
        index = self.keys.user_keys(user)
        keys = await self.redis.smembers(index)
        touched = 0
        for key in keys:
            if await self.redis.type(key) == "list":
                touched += await self._remove_user_turns(key, user)
            else:
                touched += await self.redis.delete(key)
        touched += await self.redis.delete(index, self.keys.rate(user))
        touched += await self._remove_dead_letters(user)
        return touched

    async def _remove_dead_letters(self, user: str) -> int:
        """Dead-lettered requests keep the message text: the user's go too."""
        from base.protocol import ProtocolError, Request

        ids = []
        for entry_id, fields in await self.redis.xrange(self.keys.dead_letters):
            try:
                if Request.loads(fields).user == user:
                    ids.append(entry_id)
            except ProtocolError:
                continue
        return await self.redis.xdel(self.keys.dead_letters, *ids) if ids else 0

    async def _remove_user_turns(self, key: str, user: str) -> int:
        items = await self.redis.lrange(key, 0, -1)
        kept: list[str] = []
        skip_answer = False
        for item in items:
            turn = json.loads(item)
            if turn.get("role") == "user":
                skip_answer = turn.get("user") == user
                if not skip_answer:
                    kept.append(item)
            elif not skip_answer:
                kept.append(item)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if kept:
                pipe.rpush(key, *kept)
                pipe.expire(key, self.ttl_s)
            await pipe.execute()
        return 1
