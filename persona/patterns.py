"""The text patterns and thresholds that several parts must agree on, in one place: what a
chat-template token, a stage direction and a loop look like, and House's own names. The
prompt cleaner, the post-processing, the data repair and the evaluation's metrics read them
from here, so the bot filters exactly what the evaluation counts."""

from __future__ import annotations

import re

# Chat-template tokens of the models we serve (<|im_start|>, </s>, <start_of_turn> …).
TEMPLATE_TOKENS = re.compile(r"<\|[^|>]{0,40}\|>|</?s>|<(?:start|end)_of_turn>", re.IGNORECASE)
# A whole stage direction on one line: [..], (..) or *..*.
STAGE_DIRECTION = re.compile(r"\[[^\]\n]*\]|\([^)\n]*\)|\*[^*\n]+\*")
# The same across lines, as the fan transcripts have them (data repair).
BRACKETED = re.compile(r"\[[^\]]*\]|\([^)]*\)|\*[^*]*\*")
# A direction as a generation may leave it: possibly cut off before its closing mark.
OPEN_STAGE_DIRECTION = re.compile(r"\[[^\]]*\]?|\([^)]*\)?|\*[^*\n]*\*?")
# House's own names: a reply that starts with one of them as a speaker tag is his line.
SELF_NAMES = ("House", "Dr. House", "Gregory House")
# A reply whose share of repeated 4-grams is above this loops.
LOOP_SEQ_REP = 0.2
