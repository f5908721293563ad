"""House's differentials: his answer to a user's own complaint, from the pack's
``differentials`` file (``persona/packs/house_differentials.yaml``; format and matching:
`persona.cued`).

Neither the 135M model nor the series' lines know what a butterfly rash or a stiff neck with a
fever means for *this* user: the model knows no medicine, and the series' lines answer other
patients. A message that names a complaint of the file gets House's answer to it, written for
the bot: a diagnosis or the question that decides it, and where to go now when it can kill.
"""

from __future__ import annotations

import re
from pathlib import Path

from persona.cued import CuedAnswers, load_cued

# The message is about the writer or someone of theirs — it says so, or it names nobody else
# ("tongue feels numb on one side since this morning"): a complaint about House himself ("does
# your leg hurt?"), a line of the series about a patient ("He's got a fever") or about medicine
# in general ("It leads to rheumatic fever.") is not one.
_ABOUT_THEM = re.compile(
    r"\b(?:i|i'm|im|i've|ive|i'd|my|me|myself)\b|\b(?:sons?|daughters?|kids?|"
    r"child(?:ren)?|baby|newborn|infant|toddler|wife|husband|partner|mom|mum|mother|dad|"
    # "bf is 52 and has had heartburn all evening, hes sweaty" (reading 32)
    r"bf|gf|hubby|spouse|fianc[eé]e?|"
    r"father|grand\w+|boyfriend|girlfriend|brother|sister|friend|roommate|"
    # a household ("whole family has headaches", "our great dane") and its pets ("13yo cat
    # drinking … she eats like a horse"; reading 25)
    r"(?:whole|my|our) family|cat|dog|puppy|kitten|rabbit|bunny|hamster|guinea pig|"
    # a breed needs "our" ("our lab" is a dog, "the lab" a test)
    r"our (?:\w+ )?(?:dane|shepherd|lab|labrador|retriever|beagle|terrier|poodle|collie|"
    r"husky))\b", re.I)
_SOMEONE_ELSE = re.compile(r"\b(?:you|your|yours|he|she|him|his|her|hers|they|them|their|"
                           r"it's|patient|house|wilson|cuddy|cause|causes|caused|"
                           r"leads?|explains?)\b|'s\b", re.I)


# Thanks for being right, with the news ("took my mom to urgent care like you said and it was her
# gallbladder, thanks man"; readings 29 and 31 got the complaint's answer again): not a complaint.
_THANKED = (re.compile(r"\b(?:thanks|thank you|thx|ty)\b", re.I),
            re.compile(r"\blike (?:you|u) said\b", re.I),
            re.compile(r"\b(?:went|took|turned out|it was|they said|said it was|diagnosed)\b",
                       re.I))


def _theirs(message: str) -> bool:
    """Whether ``message`` is about the writer or someone of theirs (`_ABOUT_THEM`), or names
    nobody else (`_SOMEONE_ELSE`) — and is not thanks, with the news, for an answer that was
    right (`_THANKED`: all three)."""
    if all(p.search(message) for p in _THANKED):
        return False
    return bool(_ABOUT_THEM.search(message)) or not _SOMEONE_ELSE.search(message)


def load_differentials(path: Path) -> CuedAnswers:
    """Read a differentials file: only a message about the writer or someone of theirs is
    answered."""
    return load_cued(path, "differential", applies=_theirs)
