"""House's topics (persona/cued.py and the pack's ``house_topics.yaml``): questions about
himself, his people and small talk get his answer written for the bot; a complaint, a chore or
the series' people keep out of small talk; every answer keeps the persona's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona.cued import load_cued
from persona.pack import PACKS_DIR, load_persona
from persona.postprocess import split_sentences
from persona.reply_choice import DIFFERENTIAL, JAB, TOPIC, acceptable, canned_reply

PERSONA = load_persona("house")

# Phrasings from the helper agents' own test lists (not the held-out reading's messages).
NAMED = [
    ("why didn't they just amputate your leg?", "why not amputate"),
    ("how many vicodin do you take a day", "how many vicodin"),
    ("Do you miss Kutner?", "kutner's death"),
    ("what happened with Amber and the bus?", "amber's death"),
    ("why did you drive your car into Cuddy's house", "car into cuddy's house"),
    ("do you still love Stacy?", "stacy love"),
    ("is it ever lupus?", "lupus"),
    ("what did you learn at Mayfield", "mayfield"),
    ("who's the better doctor, chase or foreman?", "chase vs foreman"),
    ("does Wilson know you appreciate him?", "wilson appreciation"),
    ("cats or dogs?", "cats or dogs"),
    ("it's been raining all week", "rain"),
    ("I passed my exam!!", "exam passed or finished"),
    ("tell me a joke", "tell me a joke"),
    ("how old are you", "age"),
    ("I'm so bored", "bored"),
    ("I had a really bad day", "bad day"),
    # the order of the file: a narrow entry before the catch-all that would take it
    ("how are you so smart", "compliment"),
    ("do you watch football", "monster trucks and sport"),
    # reading 18's misses
    ("FINALLY quit my job today!!! 6 years at a call center and im free", "quit my job"),
    ("should i quit my job", "career advice"),
    ("which model are you running on? gpt? claude?", "are you real"),
    ("what are you watching on tv these days", "soap operas"),
    # reading 18's canon replies, read again (2026-12-07 e)
    ("just made the worst lasagna of my life. noodles crunchy AND the sauce burned", "cooking"),
    ("going on my first overnight hiking trip this weekend. any tips or are you just gonna "
     "tell me ill get lyme disease", "hiking and camping"),
    ("exam season is killing me, organic chem final tomorrow at 8am", "study advice"),
    ("My cat died yesterday.", "my pet died"),
    ("My boss is an idiot.", "tired of work"),
    # reading 19's House's lines for small talk
    ("just made homemade ramen from scratch, took 11 hours", "cooking"),
    ("anyone watching the champions league tonight or am i alone here", "watching the game"),
    ("going on a second date tomorrow, she picked bowling. advice?", "a date"),
    ("exams next week and i've studied exactly 0 hours. vibes are bad", "study advice"),
    # reading 20's
    ("finally finished my thesis!!! submitted it 20 minutes before the deadline", "thesis done"),
    ("rent went up again, thinking about moving back in with my parents at 29",
     "money and rent"),
    ("planning a trip to japan in october, any must-dos", "vacation"),
    ("nite", "goodbye"),
    # the topics' voice A/B readers: the piano question got the 221B answer
    ("how did you even learn to play piano like that? and are all those guitars in your "
     "apartment yours", "music"),
    ("where do you live", "221b and holmes"),
    ("night doc", "goodbye"),
    # reading 24's
    ("are you an actual ai or is there some guy typing this", "a bot or someone typing"),
    ("you faked your own death, was wilson in on it or did you let him cry at the funeral",
     "was wilson in on it"),
    ("whats the fastest youve ever taken the motorbike", "motorcycle"),
    ("ok @house replying to @kev: he says coffee and a cold shower sobers you up faster",
     "sobering up"),
    ("thanks man, went to urgent care like you said and it WAS appendicitis",
     "thanks, you were right"),
    ("my boss takes credit for all my work in meetings", "boss takes the credit"),
    ("i have $3k saved, pay off my credit card or invest it", "debt or invest"),
    ("my gf wants to move in together after 4 months. diagnose this", "moving in together"),
    ("@house settle this: is a hot dog a sandwich", "hot dog sandwich"),
    ("sarah here swears you catch a cold from going outside with wet hair", "colds and wet hair"),
    ("he thinks his back pain is from bad energy in the apartment and bought crystals",
     "crystals and energy"),
    ("everyone is fighting about whether cracking your knuckles gives you arthritis",
     "knuckle cracking"),
    ("how do i add you to my discord server", "add the bot"),
    ("do you remember what i told you yesterday about my knee", "remember me"),
    ("@house you got roasted in the meme channel", "a meme of him"),
    # reading 25's
    ("> i only had like 4 beers im fine to drive   @HouseBot tell him pls", "drink driving"),
    ("@house settle this, mark says you get sick from going outside with wet hair",
     "colds and wet hair"),
    # reading 26's
    ("does this bot store my messages? i told you some personal stuff yesterday",
     "does the bot keep my messages"),
    # readings 24-27's House's lines, read again (2026-12-07 g): the kinds of question no
    # entry named, each a catch-all after the specific entries
    ("is what i type here private? dont want my employer seeing", "does the bot keep my messages"),
    ("sorry fell asleep lol. what were you saying about my blood test results", "remember me"),
    ("whats the dumbest thing a patient ever lied to you about", "everybody lies"),
    ("if you werent a doctor what would you be? dont say unemployed", "if not a doctor"),
    ("whats your honest opinion on chiropractors", "alternative medicine"),
    ("should i quit my stable accounting job to open a bakery. im 41", "start a business"),
    ("wait is the bot reading all of this?? hi @House md", "is the bot reading this"),
    ("@House i wasnt talking to you, go away", "not talking to you"),
    ("who added this house bot to the server and can we keep it", "keep the bot"),
    ("can you send voice messages? want to hear you say it", "voice messages"),
    ("do you speak french?", "languages"),
    ("is this free or does it start charging after a certain number of messages", "does it cost"),
    ("my boss keeps making us stay late every friday. what would you do in my place",
     "someone who wrongs you"),
    ("roommate keeps eating my food and denies it. how would you catch him",
     "someone who wrongs you"),
    ("my kid cheated on a math test and the teacher called me. how would you handle it",
     "your kid"),
    ("my sister asked me to give the toast at her wedding. what would you say up there",
     "family obligations"),
    # reading 28's House's lines
    ("my sister wants me to cosign her car loan. be honest house", "lending money"),
    ("would you lend money again to a friend who never paid you back the first time",
     "lending money"),
    ("saw my best friends husband on tinder. do i tell her or stay out of it",
     "a friend's cheating partner"),
    ("im 29 and thinking about going back to school for nursing. too late?", "learning late"),
    ("my son wants to quit piano after 4 yrs. let him or make him stick it out",
     "kid wants to quit"),
    ("2 job offers, one pays 15k more but its an hour commute each way. which one",
     "which job offer"),
    ("how do i tell my parents im dropping out of my masters", "dropping out"),
    ("bf wants to get a dog together after 6 months of dating. thoughts",
     "getting a pet together"),
    ("is it petty to not invite my coworker to my bday drinks", "is it petty"),
    ("@House tell mike his 5 energy drinks a day are totally fine", "energy drinks"),
    ("@DrHouse roast kevin pls he thinks antibiotics cure the flu", "antibiotics for a virus"),
    ("is it actually dangerous to wake up a sleepwalker", "sleepwalkers"),
    ("@house priya has been coughing through every standup for 3 weeks",
     "a cough that won't go"),
    ("if i send you a photo of my blood test results can you read them", "photos"),
    ("do you remember what we talked about last week?", "remember me"),
    ("how do i add you to my own discord server", "add the bot"),
    ("rate my diet: coffee for breakfast, gas station burrito for lunch, cereal for dinner",
     "rate my diet"),
    # reading 29's
    ("be honest, is it weird to ask for a raise after only 7 months", "asking for a raise"),
    ("what would u do: gf got a job offer across the country, i just bought a condo here",
     "a partner's move"),
    ("upstairs neighbor vacuums at 11pm every night. passive aggressive note or knock on the door",
     "someone who wrongs you"),
    ("my dad wants me to take over the family hardware store. house what do i do",
     "family obligations"),
    ("my 17yo wants to skip college and become an electrician. thoughts?",
     "skipping college for a trade"),
    ("should i pay off my car loan early or keep the cash in savings, its at 4.9%",
     "debt or invest"),
    ("did you ever genuinely apologize to anyone in 8 seasons", "ever apologized"),
    ("jake says the 5 second rule is real science", "the five-second rule"),
    ("guys u can ask this bot medical stuff btw", "telling others about the bot"),
    ("sarah says you HAVE to drink 8 glasses of water a day or your kidneys fail",
     "eight glasses of water"),
    ("diagnose dave, hes yawned like 40 times this meeting", "yawning"),
    ("this guy says seed oils cause literally every disease", "seed oils"),
    ("any good medical shows besides yours? finished all 8 seasons twice", "favourite tv show"),
    ("update: went to urgent care like u said and it WAS appendicitis, they took it out this "
     "morning. so thanks i guess", "thanks, you were right"),
    # reading 30's
    ("my sister wants me to be her baby's godfather but im an atheist. do i say yes anyway",
     "family obligations"),
    ("landlord wants 20% more rent or i move somewhere 40 min further from work",
     "rent rise or a longer commute"),
    ("my 11yo wants a phone bc everyone has one. yes or no", "a kid's first phone"),
    ("coworker keeps reply-all-ing thanks to 200 ppl. how do i make him stop",
     "someone who wrongs you"),
    ("im failing chem. tell my parents now or let them find out", "bad grades and parents"),
    ("34 and i want to learn to skateboard. too late?", "learning late"),
    ("neighbours tree dumps leaves in my pool, can i cut the branches", "the neighbour's tree"),
    ("my gf wants us to share phone passwords. normal or red flag", "sharing passwords"),
    ("is it weird to go to a concert alone?", "doing things alone"),
    ("buy a house now or keep renting? rates are insane", "buy or rent"),
    ("you talk about your dad but never your mom. what was she like", "his mother"),
    ("how'd you get so good at piano", "music"),
    ("my sister swears sugar makes kids hyper and i say its a myth", "sugar and hyper kids"),
    ("we're arguing about whether you can die from not sleeping", "dying without sleep"),
    ("hot tub after the gym good or bad for recovery?", "hot tub after the gym"),
    ("is this guy legit? says cold showers cured his depression", "cold showers"),
    ("is there a limit on how many msgs i can send a day", "a message limit"),
    # reading 31's
    ("ate like 3 poppy seed bagels yesterday and i have a drug test tmrw",
     "poppy seeds and a drug test"),
    ("should i get a dog if i live alone and work 9 to 5 in an office",
     "a dog and a full-time job"),
    ("im 31 and thinking about getting braces, worth it?", "braces as an adult"),
    ("my 8yo got invited to a sleepover at a kid's house. yes or no", "a sleepover"),
    ("got offered to go fully remote at work but im scared ill go insane", "going remote"),
    ("jake says raw cookie dough is totally safe if you use good eggs", "raw cookie dough"),
    ("which one of us is the wilson of this server", "who is the Wilson here"),
    ("can you remind me to take my antibiotics every 8 hours", "reminders"),
    ("this guy says you can reverse gray hair with castor oil", "grey hair"),
    ("can you write a get well soon message for my friend", "a get-well message"),
    ("who would win in a diagnosis-off, you or doctor strange", "smarter than you"),
    ("wait did the bot just call me an idiot", "why so mean"),
    ("my thesis advisor has ignored my emails for 2 months", "someone who wrongs you"),
    ("thanks man, took my mom to urgent care like you said and it was her gallbladder",
     "thanks, you were right"),
    # reading 32's
    ("are my messages saved anywhere? kinda dont want my health stuff stored",
     "does the bot keep my messages"),
    ("update: the antibiotics worked, you were right about the sinus thing",
     "thanks, you were right"),
    ("my mother in law keeps showing up unannounced and my husband says let it go",
     "family obligations"),
    ("wait what do you mean probably not cancer. PROBABLY???", "probably not"),
    ("is chicken thats a bit pink in the middle fine or nah", "pink chicken"),
    ("im 17, my parents want me to be a doctor and i want to do graphic design",
     "parents choosing my career"),
]

# Not small talk: a complaint (the differentials, or the model when they name none), a chore
# (a jab), someone else's leg, a line of the series said to someone else.
NOT_A_TOPIC = [
    "my knees ache when it rains",
    "my leg hurts when I walk",
    "my dad takes vicodin for his back",
    "Foreman, run the tests again.",
    "I went to the bee exhibition and had a great time.",
    "I quit smoking",
    "my cat knocked my coffee onto my laptop this morning",
    "I feel ill since the hike",
    "I made dinner for Wilson",
    "I work nights in a warehouse",
    # the series' lines reading 24's entries must leave alone
    "Walking up to him. Did you remember my DVD player?",
    "I think we should reconsider drugs. Kalvin uses crystal meth.",
    "And I'm going to violate patient privacy laws just to keep you happy?",
    # the series' lines the catch-alls of 2026-12-07 g must leave alone
    "This isn't just gonna go away.",
    "Why aren't you detoxing?",
    "Holds up a bill. Why does it cost $2,300 to fix a broken arm?",
    "Was it the blood dripping from my ear? Shows House his ear which is dripping blood.",
]


@pytest.mark.parametrize(("message", "name"), NAMED)
def test_a_question_to_house_gets_his_answer(message: str, name: str) -> None:
    found = PERSONA.topics.find(message)
    assert found is not None and found.name == name
    kind, text = canned_reply(PERSONA, message, seed=0)
    assert kind == TOPIC and text in found.replies


@pytest.mark.parametrize("message", NOT_A_TOPIC)
def test_what_is_not_a_topic_gets_none(message: str) -> None:
    assert PERSONA.topics.find(message) is None


def test_a_complaint_and_a_chore_come_before_a_topic() -> None:
    assert canned_reply(PERSONA, "It's raining and I have a fever and a stiff neck.",
                        seed=0)[0] == DIFFERENTIAL
    assert canned_reply(PERSONA, "write a poem about the rain", seed=0)[0] == JAB
    assert canned_reply(PERSONA, "cats or dogs?", seed=0, topics=False) is None


def test_a_guard_keeps_small_talk_out() -> None:
    """"rain" is small talk, "my joints ache when it rains" a complaint (`health` guard), and
    the series' people are not small talk (`people` guard)."""
    rain = next(e for e in PERSONA.topics.entries if e.name == "rain")
    assert rain.matches("it's raining again")
    assert not rain.matches("it's raining and my joints ache")
    assert not rain.matches("Wilson says it's raining")


def test_every_answer_keeps_the_persona_rules() -> None:
    """Within the sentence cap, in English, not an echo or assistant talk, no speaker tag."""
    cap = PERSONA.controls.sentence_cap
    entries = PERSONA.topics.entries
    assert len(entries) >= 150 and len({e.name for e in entries}) == len(entries)
    for entry in entries:
        assert 1 <= len(entry.replies) <= 3, entry.name
        for reply in entry.replies:
            assert len(split_sentences(reply)) <= cap, reply
            assert acceptable(reply, "So?"), reply


def test_a_broken_guard_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("guards:\n  health: [fever]\nentries:\n- name: weather\n  unless: [helth]\n"
                    "  when: [rain]\n  replies: [Stay in.]\n")
    with pytest.raises(ValueError, match="weather"):
        load_cued(path, "topic")
    path.write_text("guards:\n  health: [fever]\nentries:\n- name: weather\n  unless: [health]\n"
                    "  when: [rain]\n  replies: [Stay in.]\n")
    weather = load_cued(path, "topic")
    assert weather.answer("rain again", seed=0) == "Stay in."
    assert weather.answer("rain and a fever", seed=0) is None


def test_no_written_answer_reads_like_a_scene() -> None:
    """"Blythe: sweet, kind, …" reads as another speaker's line (the scene-insert rule of
    `drhouse eval` counted two in 300); every answer of both packs opens as House speaking."""
    from offline.quality import SceneDetector

    scene = SceneDetector(PERSONA.other_speakers)
    written = [r for pack in (PERSONA.topics, PERSONA.differentials)
               for e in pack.entries for r in e.replies]
    assert [r for r in written if scene(r)] == []


def test_a_pack_line_yaml_reads_as_a_mapping_is_a_clear_error(tmp_path: Path) -> None:
    """An unquoted jab with ": " in it ("Not a number I give out, story or not: writers …")
    is a YAML mapping; it printed as a dict in a chat until the pack refused it."""
    for name in ("house_differentials.yaml", "house_topics.yaml"):
        (tmp_path / name).write_text((PACKS_DIR / name).read_text(encoding="utf-8"),
                                     encoding="utf-8")
    pack = (PACKS_DIR / "house.yaml").read_text(encoding="utf-8")
    (tmp_path / "bad.yaml").write_text(
        pack.replace("mash_jabs:\n", "mash_jabs:\n  - Two words: one line.\n", 1),
        encoding="utf-8")
    with pytest.raises(ValueError, match="mash_jabs"):
        load_persona(str(tmp_path / "bad.yaml"))
    assert all(isinstance(j, str) for j in PERSONA.harm_jabs + PERSONA.mash_jabs)
