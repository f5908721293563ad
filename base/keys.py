"""Every Redis key, stream and consumer-group name, in one place.

A ``Keys`` is built from the configured prefix, so tests and parallel deployments can share
one Redis without touching each other's data.
"""

from __future__ import annotations

from dataclasses import dataclass

WORKERS_GROUP = "workers"
FRONTEND_GROUP = "frontend"
BASE_VARIANT = "__base__"
# The /compare variant that is the bot's own answer: the adapter's candidates and canon lines.
HYBRID_VARIANT = "hybrid"
# A worker's health key lives this long after its last report; frontends and `drhouse health`
# count a worker as alive while it exists.
HEALTH_WINDOW_S = 30


@dataclass(frozen=True)
class Keys:
    prefix: str = "house"

    @property
    def requests(self) -> str:
        """The stream every frontend adds requests to."""
        return f"{self.prefix}:requests"

    @property
    def dead_letters(self) -> str:
        """Requests delivered too many times, kept for inspection."""
        return f"{self.prefix}:dead"

    @property
    def envelopes(self) -> str:
        """A hash of each unanswered request's address (the request without its text), by
        stream entry id: a request that vanished from the stream (deleted by hand) still gets
        an apology."""
        return f"{self.prefix}:envelopes"

    def replies(self, frontend: str) -> str:
        """The reply stream of one frontend instance."""
        return f"{self.prefix}:replies:{frontend}"

    def history(self, conversation: str) -> str:
        return f"{self.prefix}:hist:{conversation}"

    def order(self, conversation: str) -> str:
        """A list of a conversation's unanswered request entry ids, oldest first: a worker
        answers only the head, so one conversation's messages are answered in order even when
        several workers hold them."""
        return f"{self.prefix}:order:{conversation}"

    def last_request(self, conversation: str) -> str:
        """The last chat request of a conversation, for /retry."""
        return f"{self.prefix}:last:{conversation}"

    def canon_recent(self, conversation: str) -> str:
        """A sorted set of the canon lines (data-set rows) a conversation heard lately, so none
        is said twice within ``CANON_REPEAT_WINDOW`` replies."""
        return f"{self.prefix}:canon:{conversation}"

    def user_keys(self, user: str) -> str:
        """A set of every key stored about a user, so /forget can delete them all."""
        return f"{self.prefix}:user:{user}:keys"

    def answered(self, request_id: str) -> str:
        """Set once a frontend delivered the reply to a request (drops duplicates)."""
        return f"{self.prefix}:answered:{request_id}"

    def seen_message(self, frontend: str, chat: str, message: str) -> str:
        """Set when a platform message was first handled: a poll or webhook retry that
        delivers the same update again is ignored."""
        return f"{self.prefix}:seen:{frontend}:{chat}:{message}"

    def rate(self, user: str) -> str:
        return f"{self.prefix}:rate:{user}"

    def health(self, worker: str) -> str:
        return f"{self.prefix}:health:{worker}"

    @property
    def health_pattern(self) -> str:
        return f"{self.prefix}:health:*"

    @property
    def stats(self) -> str:
        """A hash of counters the workers keep (replies, errors, dead letters)."""
        return f"{self.prefix}:stats"

    @property
    def all_pattern(self) -> str:
        return f"{self.prefix}:*"
