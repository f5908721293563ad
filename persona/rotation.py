"""Which of a few canned lines to say: the one a seed picks, or the next one on that the
conversation has not heard — the pack's jabs and its differentials' answers both rotate so."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def unheard(options: Sequence[str], seed: int, heard: Collection[str] = ()) -> str:
    """``options[seed]`` (cyclically), or the next one on not in ``heard``; the seed's own when
    every one was heard. ``options`` must not be empty."""
    order = [options[(seed + i) % len(options)] for i in range(len(options))]
    return next((o for o in order if o not in heard), order[0])
