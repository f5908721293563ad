"""Turn a reply into the text a user sees."""

from __future__ import annotations

from base.keys import BASE_VARIANT, HYBRID_VARIANT
from base.protocol import Reply


def variant_label(name: str) -> str:
    if name == BASE_VARIANT:
        return "Base model"
    if name == HYBRID_VARIANT:
        return "House (adapter + his real lines, what the bot answers)"
    return f"{name.capitalize()} (fine-tuned)"


def format_reply(reply: Reply) -> str:
    """Plain text (no parse mode): a chat reply, an error sentence, or /compare side by side."""
    if reply.error:
        return reply.error
    if reply.variants:
        blocks = [f"{variant_label(v.name)} — "
                  + ("a line from the series" if v.won == "canon"
                     else f"{v.tokens} tokens, {v.ms:.0f} ms") + f":\n{v.text}"
                  for v in reply.variants]
        return "\n\n".join(blocks)
    return reply.text or ""
