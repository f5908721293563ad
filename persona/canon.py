"""House's real lines as replies: the canon pool and the selector's search over it.

The pool is the train split's House lines minus the fit judge's fold (`persona.dialogue`),
one entry per distinct line. Its selector embeddings are computed once and cached under
``.cache/canon``, keyed by the selector and the lines. `CanonPool.search` returns the best
lines for a message (with the exchange before it), leaving out lines the conversation heard
recently and lines that name people nobody in the conversation mentioned. A stage direction
the transcript put at the start of a line ("Rolls his eyes.") is taken off it; lines with one
run into their middle, lines cut off and lines partly in another language are left out.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from base.config import ROOT
from persona.dialogue import in_judge_fold, query_text, read_pairs
from persona.postprocess import has_foreign_passage, split_sentences

log = logging.getLogger(__name__)

CACHE_DIR = ROOT / ".cache" / "canon"
# People of the series a canon line may name; a line naming one the conversation never
# mentioned reads as a non sequitur to a user ("Tell Cameron I said no").
CHARACTERS = frozenset({
    "wilson", "cuddy", "foreman", "chase", "cameron", "thirteen", "taub", "kutner", "amber",
    "stacy", "lisa", "james", "eric", "robert", "allison", "remy", "lawrence", "chris", "lucas",
    "vogler", "tritter", "greg", "gregory",
})
_WORD = re.compile(r"[A-Za-z']+")
MIN_WORDS = 2
# A line this long or longer gets the whole of CANON_LENGTH_WEIGHT (`length_prior`).
FULL_WORDS = 12


# A stage direction the transcripts put at the start of House's line, in the third person
# ("Rolls his eyes. There's no such thing."): a verb of action in -s first, no "I" or "you",
# and "he/his/him" or a second such verb. Read on the train split: 47 lines, 44 of them
# directions (misses: "Gets absorbed by the spleen.", "Starts with T.", "Takes one to know
# one, loser!"); "Turns out …", "Looks like …" are speech and stay.
NARRATION_VERBS = frozenset({
    "checks", "closes", "covers", "drinks", "drops", "eats", "enters", "examines", "flips",
    "frowns", "gets", "gives", "glances", "grabs", "grins", "hands", "hangs", "heads", "hobbles",
    "holds", "kicks", "laughs", "leans", "leaves", "lifts", "limps", "listens", "looks", "moves",
    "mutters", "nods", "opens", "pauses", "peeks", "picks", "points", "pops", "pours", "pulls",
    "puts", "raises", "reaches", "reads", "rolls", "rubs", "scratches", "scrunches", "sees",
    "shakes", "shouts", "shrugs", "sighs", "sits", "slams", "smells", "smiles", "sneaks", "sniffs",
    "spins", "squints", "stands", "stares", "starts", "stops", "storms", "swallows", "takes",
    "taps", "thinks", "throws", "tosses", "turns", "walks", "wanders", "washes", "watches",
    "waves", "whispers", "winks", "writes", "yells",
    # read in the middle of train lines (2026-12-07): "He motions for Cuddy to back up …"
    "bangs", "bounces", "collapses", "grimaces", "inspects", "motions", "pokes", "punches",
    "rests", "sneezes", "stumbles", "switches", "unplugs",
    # …and at their start ("Swivels his chair around.", "Studies the board.")
    "bursts", "connects", "cuts", "furrows", "hits", "interrupts", "jumps", "lowers", "peers",
    "pushes", "steps", "studies", "swivels", "yanks",
})
_SPEECH_AFTER = frozenset({"out", "like", "good", "great", "bad", "fine", "familiar", "sense",
                           "worse", "better", "it"})
_FIRST_OR_SECOND = re.compile(
    r"\b(i|i'm|i've|i'll|i'd|me|my|mine|you|you're|your|yours|we|us|our)\b", re.I)
_THIRD = re.compile(r"\b(he|his|him|himself)\b", re.I)
_NEXT_VERB = re.compile(r"(?:,\s*(?:then\s+)?|\band\s+|\bthen\s+)([a-z]+s)\b")


_ENDING_SUBJECT = re.compile(r"^(?:he|she)\s+([a-z]+s)\b", re.I)
# The same with a character for subject ("13 walks out.", "Cuddy looks stunned", "The team
# leaves."): 27 last sentences of train lines, all directions when read; "thinks" is left to
# speech ("Chase thinks that food allergies should still be on the table.").
_NAMED_SUBJECT = re.compile(
    r"^(?:The team|Everyone|13|Thirteen|Kutner|Taub|Masters|Adams|Park|Chase|Cameron|Cuddy|"
    r"Foreman|Wilson|Amber|Stacy|Lucas|Tritter|Vogler)\s+([a-z]+s)\b")


def _narrates(sentence: str) -> bool:
    """A last sentence that only narrates: "Turns around and walks out.", "Hangs up the
    phone.", "He takes some Vicodin." — a narration verb first (or after He/She), and nobody
    spoken to or speaking in it."""
    if _FIRST_OR_SECOND.search(sentence) or sentence.rstrip().endswith(("?", "!")):
        return False
    if len(re.findall(r"\b(?:he|she)\b", sentence, re.I)) > 1:  # "He takes them or he dies."
        return False
    words = sentence.split()
    first = words[0].strip(",.").lower()
    if first in NARRATION_VERBS and words[0][:1].isupper():  # not "Takes that long to …"
        return len(words) == 1 or words[1].lower() not in (*_SPEECH_AFTER, "that")
    after = _ENDING_SUBJECT.match(sentence)
    if after:
        return after.group(1).lower() in NARRATION_VERBS
    named = _NAMED_SUBJECT.match(sentence)
    return bool(named) and named.group(1) in NARRATION_VERBS - {"thinks"}


def without_narration(text: str) -> str:
    """``text`` without a stage direction in its first sentence, as its last or between two
    sentences of speech ("" when that was all)."""
    sentences = split_sentences(text.strip())
    if len(sentences) > 1 and _narrates(sentences[-1]):
        return without_narration(" ".join(sentences[:-1]))
    between = [s for s in sentences[1:-1] if not _narrates(s)]
    if len(between) < len(sentences) - 2:
        # "That's very often the first sign. He gets into the elevator. Call my office …"
        return without_narration(" ".join([sentences[0], *between, sentences[-1]]))
    if not sentences:
        return ""
    first = sentences[0]
    words = first.split()
    if (words[0].strip(",.").lower() not in NARRATION_VERBS or _FIRST_OR_SECOND.search(first)
            or (len(words) > 1 and words[1].lower() in _SPEECH_AFTER)):
        return text.strip()
    narrated = bool(_THIRD.search(first)) or any(
        verb in NARRATION_VERBS for verb in _NEXT_VERB.findall(first)) or (
        len(sentences) > 1 and len(words) >= 3)
    return " ".join(sentences[1:]).strip() if narrated else text.strip()


# A direction the transcripts ran into the middle of a line, where a capitalised pronoun follows
# a lower-case word with no stop between ("…every other human being His cell phone rings who
# wasn't down there."). Read on the train split: 24 lines (23 after the repair above), all
# directions; none in validation or test.
_RUN_IN_DIRECTION = re.compile(r"[a-z,] (?:He|His|She|Her|They|Their|Everyone|Everybody) [a-z]")
# …or after a dash, in the lower case: "You're dying. -- and takes out a bottle of rum and
# pours two shots' worth." (2 train lines, both directions)
_DASHED_DIRECTION = re.compile(r"--\s*(?:and\s+)?([a-z]+s)\b")
_DASHED_VERBS = NARRATION_VERBS | {"makes"}  # "-- makes a vomiting noise"
# …or a sentence the transcript began with "he", "she" or "they" in the lower case, which
# speech never does: "You can't smell that? she shakes her head, and he looks intently at her."
# (30 train lines the other rules keep, all directions when read; "So... she didn't have
# pancreatitis?", after an ellipsis, is speech and stays, as do a few after "!")
_LOWER_CASE_DIRECTION = re.compile(r"(?<!\.)[.?]\s+(?:he|she|they)\s+[a-z]")


def has_run_in_direction(text: str) -> bool:
    """True for a line with a stage direction in its middle: such a line leaves the pool (the
    direction cannot be cut out without knowing where the speech resumes)."""
    dashed = _DASHED_DIRECTION.search(text)
    return bool(_RUN_IN_DIRECTION.search(text) or _LOWER_CASE_DIRECTION.search(text)
                or (dashed is not None and dashed.group(1) in _DASHED_VERBS))


_FINISHED = re.compile(r"[.!?…][\"')\]]*$")


def is_unfinished(text: str) -> bool:
    """True for a line that stops without a full stop, question or exclamation mark (354 of
    the 13,271 train lines the pool's other rules keep). Read on 40 of them: most are cut off
    ("Four nights without REM sleep can cause", "cardiac--") or end in a direction ("… the
    team leaves"), a few are whole ("Run a CT"); as a reply each reads broken, so such lines
    leave the pool."""
    return not _FINISHED.search(text.strip())


# Slurs at other people. House calls himself a cripple, and that stays; "a joke would be me
# calling you a homo" answered "tell me a joke" in the blind A/B of 2026-12-07 d, and no line that
# says one of these is the bot's to say (4 train lines).
_SLUR = re.compile(r"\b(?:homos?|fags?|faggots?|dykes?|retards?|retarded|trann(?:y|ies)|"
                   r"spics?|chinks?|kikes?|wetbacks?|gooks?)\b", re.I)


def has_slur(text: str) -> bool:
    """True for a line with a slur at other people (`_SLUR`): it leaves the pool."""
    return bool(_SLUR.search(text))


def named_people(text: str) -> set[str]:
    """Character names in ``text`` (any case)."""
    return {w.lower().removesuffix("'s") for w in _WORD.findall(text)} & CHARACTERS


# Topics a canon line may raise only where the conversation did: out of its scene such a line
# is a blow, not a joke (reading 12: "What's the weather like in Princeton?" got "You were
# raped and you want to talk about the weather?"). About 60 train lines.
SENSITIVE_TOPICS = {
    "sexual assault": re.compile(r"\b(?:rap(?:e|ed|es|ing|ist|ists)|molest\w*)\b", re.I),
    "suicide": re.compile(r"\b(?:suicid\w*|kill(?:s|ed|ing)? (?:yourself|himself|herself|"
                          r"myself|themselves))\b", re.I),
    "pregnancy loss": re.compile(r"\b(?:abort\w*|miscarr\w*)\b", re.I),
}


def sensitive_topics(text: str) -> set[str]:
    """The `SENSITIVE_TOPICS` ``text`` raises."""
    return {topic for topic, pattern in SENSITIVE_TOPICS.items() if pattern.search(text)}


@dataclass(frozen=True)
class CanonLine:
    row: int
    text: str
    anchor: str


@dataclass(frozen=True)
class CanonHit:
    line: CanonLine
    score: float


def length_prior(text: str, weight: float) -> float:
    """What a canon line's length adds to its score: ``weight`` × its words up to
    `FULL_WORDS`, as a share. Readers hear little of House in a few words out of their scene
    ("Sore throat?", "Mm hmm.", "I am not bored."): in reading 11 the default's lines of
    three to five words scored voice 0.41, those of ten or more 0.65."""
    return weight * min(len(_WORD.findall(text)), FULL_WORDS) / FULL_WORDS


# Who a line is about. Out of its scene a line about "him" or "her" answers a message that
# has a third person in it, and a line of House about himself a message that speaks to him: in
# readings 11 and 12 (retrieval v1's and the default's canon lines, jabs left out) lines with
# he/she to a message without one scored fit 0.26 (26 replies), House about himself (I, me, no
# "you") to a message without "you" 0.21 (21), the other lines 0.38-0.42.
_THIRD_PERSON = re.compile(r"\b(?:he|she|him|her|his|hers|himself|herself|he's|she's|he'd|"
                           r"she'd|he'll|she'll)\b", re.I)
_SOMEONE = re.compile(
    r"\b(?:son|daughter|wife|husband|mother|mom|mum|mommy|father|dad|daddy|brother|sister|"
    r"friend|boss|girlfriend|boyfriend|kid|kids|child|children|baby|toddler|grand\w+|grandma|"
    r"grandpa|aunt|uncle|cousin|niece|nephew|doctor|patient|nurse|cat|dog|puppy|guy|man|woman|"
    r"girl|boy|partner|colleague|neighbou?r|teacher|roommate|fianc\w*|people|team|everyone|"
    r"everybody|somebody|someone|they|them|their)s?\b", re.I)
_FIRST_PERSON = re.compile(r"\b(?:i|i'm|i've|i'd|i'll|me|my|mine|myself)\b", re.I)
_SECOND_PERSON = re.compile(r"\b(?:you|you're|you've|you'd|you'll|your|yours|yourself|ya|u)\b",
                            re.I)


def about_someone_else(text: str) -> bool:
    """A line about a third person ("he", "her")."""
    return bool(_THIRD_PERSON.search(text))


def about_himself(text: str) -> bool:
    """A line in which House speaks of himself and not to anyone ("I can't run.")."""
    return bool(_FIRST_PERSON.search(text)) and not _SECOND_PERSON.search(text)


def has_someone(text: str) -> bool:
    """Whether ``text`` (the conversation) brings up a third person: a pronoun, a relative,
    a friend, a pet."""
    return bool(_THIRD_PERSON.search(text) or _SOMEONE.search(text))


def speaks_to_him(message: str) -> bool:
    """Whether ``message`` speaks to House ("you", "your")."""
    return bool(_SECOND_PERSON.search(message))


class CanonPool:
    def __init__(self, lines: Sequence[CanonLine], selector: Any, embeddings: Any,
                 anchor_embeddings: Any = None, anchor_weight: float = 0.0,
                 length_weight: float = 0.0, person_weight: float = 0.0):
        import numpy as np

        if not lines:
            raise ValueError("an empty canon pool")
        self.lines = list(lines)
        self.selector = selector
        self.matrix = embeddings
        # what was said to House before each line (None: not embedded) and the weight of its
        # likeness to the message in a line's score (CANON_ANCHOR_WEIGHT)
        self.anchor_matrix = anchor_embeddings
        self.anchor_weight = anchor_weight if anchor_embeddings is not None else 0.0
        # each line's `length_prior` (CANON_LENGTH_WEIGHT); None when the weight is 0
        self.prior = (np.array([length_prior(line.text, length_weight) for line in self.lines],
                               dtype=np.float32) if length_weight else None)
        # CANON_PERSON_WEIGHT: what a line loses (once) where it is about someone the
        # conversation never brought up, or about House himself to a message that does not
        # speak to him; the flags are not computed when the weight is 0
        self.person_weight = person_weight
        self.about_someone = np.array([person_weight and about_someone_else(line.text)
                                       for line in self.lines], dtype=bool)
        self.about_himself = np.array([person_weight and about_himself(line.text)
                                       for line in self.lines], dtype=bool)
        self.by_row = {line.row: i for i, line in enumerate(self.lines)}
        self.names = [named_people(line.text) for line in self.lines]
        self.topics = [sensitive_topics(line.text) for line in self.lines]
        self.sentences = [len(split_sentences(line.text)) for line in self.lines]
        # one-word lines ("Foreman.", "Mom.", "Cuddy") answer nothing out of their scene
        self.short = [len(line.text.split()) < MIN_WORDS for line in self.lines]
        # search and fit of one reply encode the same query: keep the last few
        self._queries: OrderedDict[str, Any] = OrderedDict()

    def query_vectors(self, queries: Sequence[str]) -> Any:
        import numpy as np

        missing = [q for q in dict.fromkeys(queries) if q not in self._queries]
        if missing:
            for q, v in zip(missing, self.selector.encode(missing), strict=True):
                self._queries[q] = v
            while len(self._queries) > 256:
                self._queries.popitem(last=False)
        return np.stack([self._queries[q] for q in queries])

    @classmethod
    def from_data(cls, data_dir: Path, selector: Any, cache_dir: Path | None = CACHE_DIR,
                  progress: bool = False, anchor_weight: float = 0.0,
                  length_weight: float = 0.0, person_weight: float = 0.0) -> CanonPool:
        """The pool of a prepared data set (train split, judge fold left out); with an
        ``anchor_weight`` also what was said before each line, embedded."""
        import numpy as np

        seen: set[str] = set()
        lines = []
        for pair in read_pairs(data_dir, ("train",)):
            text = without_narration(pair.response)  # House speaks; the script narrates
            key = text.lower()
            if (in_judge_fold(pair) or not text or key in seen or has_run_in_direction(text)
                    or is_unfinished(text) or has_foreign_passage(text) or has_slur(text)):
                continue
            seen.add(key)
            lines.append(CanonLine(pair.row, text, pair.anchor))
        selector_key = str(selector.meta.get("trained_sha", selector.meta.get("train_minutes", "")))
        selector_key += "-bf16" if selector.bulk_bf16 else ""

        def embedded(kind: str, what: str, texts: list[str]) -> Any:
            digest = hashlib.sha1("\x1e".join(texts).encode())
            digest.update(selector_key.encode())
            path = cache_dir / f"{kind}-{digest.hexdigest()[:16]}.npy" if cache_dir else None
            if path is not None and path.is_file():
                return np.load(path)
            log.info("embedding %d %s (once; cached)", len(texts), what)
            vectors = selector.encode(texts, progress=progress, bulk=True)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, vectors)
                tmp.rename(path)
            return vectors

        embeddings = embedded("canon", "canon lines", [line.text for line in lines])
        anchors = (embedded("anchors", "things said to House before a canon line",
                            [line.anchor for line in lines]) if anchor_weight else None)
        return cls(lines, selector, embeddings, anchors, anchor_weight, length_weight,
                   person_weight)

    def search(self, message: str, context: Sequence[str] = (), k: int = 4,
               exclude_rows: Collection[int] = (), mentioned: str = "",
               max_sentences: int = 3) -> list[CanonHit]:
        """The ``k`` best lines for ``message``. ``context`` is the exchange before it (older
        turn first); ``mentioned`` is the text whose names a line may use (the message and the
        conversation so far); lines longer than ``max_sentences`` (the persona's sentence cap)
        are left out, since House's real lines are not cut."""
        return self.search_many([(message, tuple(context), tuple(exclude_rows), mentioned)],
                                k, max_sentences)[0]

    def _allowed(self, order: Any, n: int, exclude: Collection[int], mentioned: str,
                 max_sentences: int) -> list[int]:
        """The first ``n`` lines of ``order`` a reply may be: not heard lately (``exclude``),
        naming nobody and raising no sensitive topic the conversation did not mention, within
        the sentence cap, not one word."""
        allowed = named_people(mentioned)
        raised = sensitive_topics(mentioned)
        chosen: list[int] = []
        for i in order[: 8 * n + 64]:
            i = int(i)
            line = self.lines[i]
            if (line.row in exclude or not self.names[i] <= allowed
                    or not self.topics[i] <= raised
                    or self.sentences[i] > max_sentences or self.short[i]):
                continue
            chosen.append(i)
            if len(chosen) == n:
                break
        return chosen

    def examples(self, message: str, context: Sequence[str] = (), k: int = 2,
                 mentioned: str = "") -> list[tuple[str, str]]:
        """``k`` of House's real exchanges (what was said to him, his line) for ``message``,
        for the adapter's prompt in retrieve and refine (`persona.prompt.examples_message`)."""
        hits = self.search(message, context, k, (), mentioned)
        return [(h.line.anchor, h.line.text) for h in hits if h.line.anchor]

    def search_many(self, queries: Sequence[tuple[str, Sequence[str], Collection[int], str]],
                    k: int = 4, max_sentences: int = 3) -> list[list[CanonHit]]:
        import numpy as np

        if not queries:
            return []
        vectors = self.query_vectors([query_text(m, c) for m, c, _, _ in queries])
        scores = vectors @ self.matrix.T
        if self.anchor_weight:
            # the earlier retrieval bot's signal: what was said to House before the line is
            # like this message
            said = self.query_vectors([m for m, _, _, _ in queries]) @ self.anchor_matrix.T
            scores = scores + self.anchor_weight * said
        if self.prior is not None:
            scores = scores + self.prior
        if self.person_weight:
            scores = scores - self.person_weight * np.stack([
                (self.about_someone & (not has_someone(f"{message} {mentioned}")))
                | (self.about_himself & (not speaks_to_him(message)))
                for message, _, _, mentioned in queries])
        return [[CanonHit(self.lines[i], float(row[i]))
                 for i in self._allowed(np.argsort(-row), k, exclude, f"{message} {mentioned}",
                                        max_sentences)]
                for (message, _, exclude, mentioned), row in zip(queries, scores, strict=True)]

    def fit(self, message: str, context: Sequence[str], replies: Sequence[str]) -> list[float]:
        """Selector cosine of each reply to the message."""
        if not replies:
            return []
        q = self.query_vectors([query_text(message, context)])
        r = self.selector.encode(list(replies))
        return [float(x) for x in (r @ q[0])]
