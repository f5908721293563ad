"""Turn a reply into the text a user sees."""

from __future__ import annotations

from base.keys import BASE_VARIANT, HYBRID_VARIANT
from base.protocol import Reply, Variant


def variant_label(name: str) -> str:
    if name == BASE_VARIANT:
        return "Base model"
    if name == HYBRID_VARIANT:
        return "House (what the bot answers)"
    return f"{name.capitalize()} (fine-tuned)"


def _how(variant: Variant) -> str:
    if variant.won == "canon":
        return "a line from the series"
    if variant.won == "differential":
        return "his answer to this complaint, written for the bot"
    if variant.won == "topic":
        return "his answer, written for the bot"
    return f"{variant.tokens} tokens, {variant.ms:.0f} ms"


def format_reply(reply: Reply) -> str:
    """Plain text (no parse mode): a chat reply, an error sentence, or /compare side by side."""
    if reply.error:
        return reply.error
    if reply.variants:
        blocks = [f"{variant_label(v.name)} — " + _how(v) + f":\n{v.text}"
                  for v in reply.variants]
        return "\n\n".join(blocks)
    return reply.text or ""
