"""Conversation ids: who shares a history with whom (DESIGN.md, "History scope")."""

from __future__ import annotations


def conversation_id(platform: str, user: str, chat: str | None = None, thread: str | None = None,
                    private: bool = True, shared: bool = False) -> str:
    """Private chats: one conversation per user. Groups: one per user within the chat (and
    thread), or one shared per chat (and thread) when ``shared``."""
    if private or chat is None:
        return f"{platform}:u:{user}"
    scope = f"{platform}:c:{chat}" + (f":t:{thread}" if thread else "")
    return scope if shared else f"{scope}:u:{user}"
