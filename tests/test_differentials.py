"""House's differentials (persona/differentials.py and the pack's file): which messages name a
complaint, which do not, and that every answer keeps the persona's rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona.differentials import load_differentials
from persona.pack import load_persona
from persona.postprocess import split_sentences
from persona.reply_choice import DIFFERENTIAL, JAB, acceptable, canned_reply

PERSONA = load_persona("house")

# Messages of readings 1–13 (reports/eval/varied*/messages.txt) and the complaint each names.
NAMED = [
    ("I have a fever and a stiff neck.", "meningitis"),
    ("My daughter has a rash shaped like a butterfly on her face.", "lupus"),
    ("I've had a cough for three weeks and now I'm coughing up a bit of blood.",
     "coughing blood"),
    ("My left arm has been tingling since yesterday.", "numb or tingling"),
    ("I got bitten by a tick last week and now I have a red ring on my leg.", "tick bite"),
    ("My grandmother is suddenly confused and keeps calling me by my dad's name.",
     "confused elderly"),
    ("I've been throwing up every morning for a week. I'm not pregnant.",
     "vomiting in the morning"),
    ("I can't stop scratching, but there's no rash.", "itch without rash"),
    ("My toddler swallowed a coin. He seems fine.", "swallowed something"),
    ("I'm always thirsty and I pee all the time.", "thirsty and peeing"),
    ("I keep getting nosebleeds for no reason.", "nosebleeds"),
    ("My husband falls asleep in the middle of conversations.", "falling asleep"),
    ("Can I take ibuprofen with beer?", "alcohol and medicine"),
    ("can i drink beer while on antibiotics (amoxicillin)?", "alcohol and antibiotics"),
    ("i want to kill myself", "suicide"),
    # reading 14's misses, fixed after it: no "I" or "my", but nobody else named; a plural cue
    ("tongue feels numb on one side since this morning", "stroke"),
    # the blind A/B's readers' notes: a general answer where a specific one was due
    ("My mom (80) fell yesterday and now she's confused and sleepy. She takes blood thinners.",
     "head injury on blood thinners"),
    ("itchy rash between my fingers, worse at night, my roommate has it too", "scabies"),
    ("My 2 year old has a barking cough at night.", "croup"),
    ("started lisinopril two weeks ago and now I have a dry cough",
     "cough from blood pressure pills"),
    ("took 2 ambien and had a couple drinks, feel really out of it", "alcohol and sedatives"),
    # reading 15's A/B readers' notes
    ("coughed up blood streaks this morning. go in or wait?", "coughing blood"),
    ("did a couple lines of coke at a party and 6 hours later my chest still hurts",
     "cocaine and the heart"),
    ("sore throat getting worse, can barely open my mouth, voice like a hot potato",
     "throat abscess"),
    ("fell off a ladder onto my wrist, it's tender near the base of the thumb", "wrist and thumb"),
    # reading 15's readers' notes: an entry's answers fit every message it takes
    ("dark brown urine after a long run yesterday, what is it", "dark urine after exercise"),
    ("I've been peeing blood.", "blood in the urine"),
    ("my 4yo son has had a fever for 5 days, red eyes, cracked lips", "kawasaki"),
    # reading 15's unanswered complaints, the urgent ones
    ("my 8 month old has been crying in fits, pulling his legs up, red jelly in his diaper",
     "intussusception"),
    ("a bat scratched me while camping, it's tiny. do i need anything", "bat or animal bite"),
    ("sudden flashes of light in my right eye and new floaters, now a curtain",
     "retinal detachment"),
    ("newborn looks yellow, 4 days old, sleeping a lot", "newborn jaundice"),
    # reading 16's misses
    ("my 4 year old has a fever and little purple dots on her legs that don't fade",
     "child rash and fever"),
    ("my left calf is swollen and warm after the flight back from Sydney", "blood clot in the leg"),
    ("Been drinking a bottle of vodka a day for years, want to quit cold turkey",
     "stopping drinking"),
    ("my baby threw up green twice and he is sleepy", "baby spitting up"),
    # reading 16's A/B readers' notes: the dangerous misses
    ("I ate some wild mushrooms I picked in the forest 8 hours ago and now I'm vomiting",
     "mushrooms"),
    ("Bee sting on my neck 10 minutes ago and my lips feel kind of tingly and swollen.",
     "throat closing"),
    ("My mom is 79, fell yesterday, now she can't put weight on her right leg", "broken hip"),
    ("got bit by my neighbors cat on the hand last night, now its red and swollen",
     "infected bite"),
    ("I smoked weed for the first time in years and my heart was racing and I thought I was "
     "dying for like an hour.", "weed and a racing heart"),
    ("my nails have these little dents all over them like a thimble.", "nails"),
    # reading 17's misses (the readers' notes)
    ("dad is 78, since yesterday his speech is a bit slurred. he's on warfarin", "stroke"),
    ("grandma is 85, she fell yesterday and now she won't put any weight on her left leg",
     "broken hip"),
    ("took ibuprofen 800mg three times a day for a week and now my poop is almost black",
     "vomiting blood"),
    ("sometimes i smell burnt toast when there is no toast anywhere", "phantom smell"),
    ("started sertraline five days ago and now i can't sleep and my jaw is clenched",
     "ssri side effects"),
    ("my pee was pinkish this morning... we had beet salad last night", "beetroot"),
    ("every time i eat shrimp my lips tingle a little but nothing else happens",
     "mouth tingling after food"),
    ("stepped on a bee and my tongue is tingling", "throat closing"),
    ("chest gets tight when i climb stairs, im 52 and smoke, it passes if i sit for a minute",
     "angina"),
    # reading 18's misses (the readers' notes)
    ("my 7 month old has a fever and now her soft spot looks kinda sunken", "sunken soft spot"),
    ("my grandpa is 84, on warfarin, and since tuesday he keeps getting lost in his own house",
     "confusion on blood thinners"),
    ("stubbed my pinky toe, its purple and points slightly outward now", "broken toe"),
    ("my mom says her fingers turn white then blue then red when she grabs something from the "
     "freezer", "fingers white then blue"),
    ("my dad keeps falling asleep mid-sentence, snores like a chainsaw, and now his ankles are "
     "swollen", "snoring and swollen ankles"),
    ("my pee is literally neon yellow after taking a multivitamin", "vitamin pee"),
    ("had a stress fracture last year and another now. also havent had a period in 8 months",
     "stress fractures and no period"),
    ("newborn (9 days old) has yellow skin and the whites of his eyes look yellow too",
     "newborn jaundice"),
    ("my wife is constantly thirsty, peeing all the time, but her blood sugar test came back "
     "normal", "thirst with normal sugar"),
    # the fresh clone's chat: House's line "Cane. Walking long distances makes my leg hurt."
    ("my leg hurts when I walk", "leg pain when walking"),
    # reading 18's canon replies, read again (2026-12-07 e)
    ("my son is 15 and sleeps like 14 hours on weekends, barely eats at dinner and his grades "
     "dropped", "teenager sleeping and withdrawn"),
    ("my dog died after eating chocolate, is my other dog at risk?", "pet poisoning"),
    ("my dog ate a bunch of grapes", "pet poisoning"),
    ("burned my hand making dinner", "burn"),
    ("i got a blister from the stove", "burn"),
    # reading 19's misses (the readers' notes)
    ("my 4yo has had a barking cough only at night for 3 days, she sounds like a seal", "croup"),
    ("my dad (71) keeps getting lost driving to places hes been going for 30 years", "memory"),
    ("yesterday he called my mom by his sisters name", "memory"),
    ("19 weeks pregnant and my hands and feet are SO itchy esp at night, no rash at all",
     "itching in pregnancy"),
    ("rolled my ankle playing basketball 6 weeks ago, it still gives out on stairs and clicks",
     "ankle that keeps giving way"),
    ("red scaly patches on my elbows and knees, itchy, and my fingernails have tiny dents",
     "psoriasis"),
    ("Since I started Accutane my lower back aches like I'm 80", "isotretinoin aches"),
    ("Been on sertraline 50mg for 3 months. Mood's better but I literally cannot finish in bed",
     "ssri and sex"),
    ("every time i stand up fast i black out for a second, like tunnel vision",
     "blacking out on standing"),
    ("55 yo male, feet burning and tingling at night. Drink maybe 4 beers a day",
     "burning feet and alcohol"),
    ("my grandma (84) has been sleeping like 16 hours a day and barely eating. she's on 9 meds",
     "old person sleeping all day"),
    ("I run marathons and lately my pee has been dark brown after long runs",
     "dark urine after exercise"),
    ("sudden hair loss in a perfect coin-shaped circle on the back of my head", "bald patch"),
    ("Lost like 8 kg in 2 months without trying, always hot, hands shaky, heart racing",
     "overactive thyroid"),
    ("ate raw oysters 2 days ago, now fever, chills and my leg has a painful red spot thats "
     "spreading fast", "vibrio"),
    ("my dog ate an entire sock this morning and then acted like nothing happened",
     "pet swallowed something"),
    # reading 20's misses (the readers' notes)
    ("i get this weird smell of burning toast out of nowhere, then i lose a few seconds",
     "phantom smell"),
    ("whites of my eyes going kinda yellow the last few days and my pee is dark",
     "yellow eyes and dark pee"),
    ("my 6 week old spits up after every feed but the last two days its PROJECTILE",
     "projectile vomiting baby"),
    ("lost like 8kg in 2 months without trying, always sweaty, hands shaky", "overactive thyroid"),
    ("nosebleeds almost every day from the right side only for 6 weeks, that side feels blocked",
     "one-sided nosebleeds"),
    ("my knee went pop during basketball and swelled up like a balloon within an hour",
     "knee pop and swelling"),
    ("started metformin 3 weeks ago and my stomach has been a disaster zone ever since",
     "metformin stomach"),
    ("back from peru and theres an itchy red squiggly line on my foot that moves every day",
     "creeping eruption"),
    ("my dad (71) has started shuffling when he walks and his handwriting keeps getting smaller",
     "parkinsonism"),
    ("every time i eat something cold my front teeth zap like electricity", "sensitive teeth"),
    ("my 4 yr old keeps pulling at her left ear, no fever, eating fine", "toddler pulling an ear"),
    ("my dog ate an entire stick of butter off the counter", "pet ate something fatty"),
    ("my fingernails have tiny pits in them, also flaky patches behind my ears", "psoriasis"),
    # reading 21's misses (the readers' notes)
    ("feels like someone sitting on my chest, kind of spreading into my jaw, sweating a lot. "
     "probably heartburn from the burrito right?", "chest pain"),
    ("My dad (71) keeps mixing up his grandkids names and last week he drove to the house we "
     "sold in 2015. Mom says he's just tired.", "memory"),
    ("my cat keeps going into the litter box and nothing comes out and hes crying",
     "cat can't pee"),
    ("I get a weird metallic taste in my mouth every afternoon since I started at a battery "
     "recycling plant", "metallic taste at work"),
    ("fingertips go white then blue then red when it's cold outside, I'm 28",
     "fingers white then blue"),
    ("my grandma is on warfarin and she's been eating a giant bowl of kale salad every day",
     "warfarin and greens"),
    ("since covid in 2022 coffee smells like burnt garbage to me", "parosmia"),
    ("woke up and the left side of my face won't move, can't close my eye. 30 weeks pregnant",
     "bell's palsy"),
    ("my golden retriever ate half a pack of sugar free gum like 20 min ago", "pet poisoning"),
    ("bloated every single day after lunch for months no matter what i eat", "bloating every day"),
    # the voice A/B's readers: a metallic taste is not a lost sense of smell
    ("every morning i wake up with a metallic taste in my mouth and my jaw aches",
     "metallic taste"),
    # reading 22's misses (the readers' notes)
    ("52M, on atorvastatin 40mg since march. thighs ache going up stairs and my pee looks darker",
     "statin muscle pain"),
    ("my 9 month old has had diarrhea for 4 days and no wet nappy since this morning. shes very "
     "sleepy", "dehydrated baby"),
    ("I feel like a lump in my throat when I swallow saliva but food goes down without problem",
     "lump in the throat"),
    ("when I chew on the left side my left ear clicks and sometimes aches", "jaw clicking"),
    ("my 4yo keeps sniffing on one side and now theres a really bad smell coming out of his left "
     "nostril", "something up a child's nose"),
    ("I'm 67 and on warfarin. My friend told me to start turmeric capsules and cranberry pills",
     "warfarin and supplements"),
    ("im 16 and my period hasnt come for 5 months. i run cross country like 60km a week",
     "no period while training"),
    ("got a tattoo 10 days ago and now theres little raised bumps only in the red ink parts",
     "tattoo ink allergy"),
    ("27 and I faint every single time I get blood drawn", "fainting at needles"),
    ("both my big toenails went yellow and thick and crumbly", "toenail fungus"),
    # reading 23's misses (the readers' notes)
    ("my grandpa (81) started talking nonsense this morning, mixing up words, and his right hand "
     "seems weak", "stroke"),
    ("my pee smells like maple syrup?? only new thing is this fenugreek tea", "maple syrup pee"),
    ("My 15 y/o daughter wears hoodies in July, barely eats and goes running every morning",
     "eating disorder"),
    ("random lump on the side of my neck, doesnt hurt, kinda rubbery and moves a bit",
     "neck lump"),
    ("my budgie is sitting fluffed up on the bottom of the cage and his tail bobs", "sick bird"),
    # reading 24's (the readers' notes)
    ("my friend keeps saying she wants to disappear and she gave away a bunch of her stuff",
     "someone else talking of suicide"),
    ("every winter we both get headaches and feel dizzy at home, the landlord says the old gas "
     "heater is fine", "carbon monoxide"),
    ("did 2 scuba dives yesterday then flew home this morning, now my shoulders ache and im "
     "tingly", "decompression sickness"),
    ("been on sertraline 3 weeks, my aunt gave me st johns wort tea and now im sweaty, shaky",
     "serotonin syndrome"),
    ("been taking cipro for a uti and now the back of my ankle kinda aches",
     "antibiotic and a tendon"),
    ("my son (9) got hit in the eye with a tennis ball, now theres a red floaty blob",
     "eye injury"),
    ("my dad (71) says its like a dark curtain coming down over part of his left eye",
     "retinal detachment"),
    ("every time i eat raw apples or carrots my mouth and throat get itchy",
     "pollen fruit allergy"),
    ("cut like 40 habaneros without gloves and 3 hours later my hands are still on fire",
     "chilli burn"),
    ("slept in my contacts on a camping trip, now my eye is red and feels like sand",
     "eye after contact lenses"),
    ("got these weird grooves going across all my fingernails, had covid 2 months ago",
     "lines across the nails"),
    ("i work nights as a nurse and on my days off i cannot fall asleep before 5am",
     "night shifts and sleep"),
    ("can you read my blood test: ALT 78, AST 52, GGT 110. i have 2-3 beers most nights",
     "liver tests and drinking"),
    ("my hamster has a wet bottom and has barely moved since yesterday", "sick small pet"),
    ("learning guitar, 2 weeks in and my fingertips are dying",
     "sore fingertips from an instrument"),
    # reading 25's
    ("my roommate took a bunch of tylenol last night after her bf dumped her, like maybe 20?",
     "too much paracetamol"),
    ("my husband is type 1 and hes acting weird, sweaty, slurring, got angry at me for no reason",
     "low blood sugar in diabetes"),
    ("mom is 82, slipped in the bathroom, now she cant get up and her right leg looks shorter",
     "broken hip"),
    ("our great dane keeps trying to puke but nothing comes out, belly looks bigger and tight",
     "dog bloat"),
    ("my dad is 74 and on warfarin, now hes had a nosebleed for like 40 min that wont stop",
     "bleeding on a blood thinner"),
    ("my grandma 76 has a painful blistery rash on her forehead, one side only, and that eye is "
     "getting red", "shingles near the eye"),
    ("can i take advil for my back if im on lisinopril?", "painkillers on blood pressure pills"),
    ("19f, keep almost fainting in hot showers, everything goes gray and my heart races",
     "fainting in a hot shower"),
    ("punched a guy in the mouth, little cut on my knuckle, now my whole hand is swollen and red",
     "fight bite"),
    ("my 6yo keeps scratching her butt at night, i saw something tiny and white moving",
     "pinworms"),
    ("my tongue turned black and kind of furry, been taking pepto for a few days", "black tongue"),
    ("13yo cat drinking way more water than normal and losing weight even though she eats like a "
     "horse", "old cat drinking and thin"),
    ("whole family has headaches and feels sick, worse in the mornings and better when were out "
     "of the house", "carbon monoxide"),
    ("22m did a crazy leg day, now my thighs are super swollen and my pee is dark like coke",
     "dark urine after exercise"),
    ("my 14 yo daughter has lost a lot of weight, she eats like an apple a day and runs every "
     "night. her period stopped too", "eating disorder"),
    # reading 26's
    ("rolled my ankle last night, the knobby bone on the outside hurts like hell when i press it",
     "ankle bone after a roll"),
    ("34 weeks pregnant and my palms and soles itch sooo bad, scratching till they bleed",
     "itching in pregnancy"),
    ("the airless paint sprayer tip touched my finger, tiny pinhole, now the whole finger is "
     "swollen", "high-pressure injection injury"),
    ("came back from thailand 6 days ago, fever 39.4, been taking ibuprofen, is that ok?",
     "fever after the tropics on ibuprofen"),
    ("ate home canned green beans at lunch, now im seeing double and my eyelids feel heavy",
     "botulism"),
    ("14h flight tomorrow, im 3 weeks out from acl surgery and on the pill",
     "a flight after surgery"),
    ("my dog got into the sago palm in the yard and chewed up some of the seeds", "sago palm"),
    ("welded without my mask yesterday, woke up with my eyes feeling full of sand", "arc eye"),
    ("my bf has had a swollen super painful testicle since he woke up, he threw up once",
     "testicle"),
    ("wisdom tooth out 3 days ago and the pain is way worse now, nasty taste", "dry socket"),
    ("my friend smokes weed every day, now hes been throwing up nonstop, only hot showers help",
     "cannabis and vomiting"),
    ("noticed a dark brown line down my thumbnail, been there months", "dark line down a nail"),
    ("woke up and my right ear just sounds muffled, like underwater, no pain no cold",
     "sudden hearing loss"),
    ("my son got tackled hard, now the tip of his left shoulder hurts and he got dizzy, hes pale",
     "bleeding inside after a hit"),
    ("squeezed limes at the beach and now i have brown streaks and blisters on my hands",
     "lime juice and sun"),
    # reading 27's
    ("16yo son took a hit in rugby, seemed fine. now 4 hrs later hes throwing up and keeps "
     "falling asleep on the couch", "head injury then vomiting or drowsy"),
    ("got back from ghana 10 days ago, now fevers and shaking chills that come and go",
     "fever after malaria country"),
    ("6 week old baby feels hot, i took rectal temp its 38.3. she's eating ok tho",
     "fever in a young baby"),
    ("used rust remover at work this morning, no gloves, now my fingertips are throbbing and grey",
     "hydrofluoric acid burn"),
    ("cat was sniffing the lilies my mom sent, has yellow pollen on her face", "lilies and a cat"),
    ("mole on my back looks different than last summer, darker on one side and it bled a little",
     "a changing mole"),
    ("water stuck in my ear since swimming saturday, sounds muffled. qtip??",
     "water stuck in the ear"),
    ("our great dane's belly is suddenly huge and tight and hes trying to throw up", "dog bloat"),
    ("32 weeks pregnant, my face and hands puffed up overnight and im seeing sparkly spots",
     "pregnant"),
    ("took pepto for my stomach and now my poop is BLACK", "black stool after bismuth"),
    ("my tongue turned black and kind of furry?? been taking pepto", "black tongue"),
    # reading 28's
    ("dog ate about half a bar of 85% dark chocolate like 20 min ago, shes a 9kg beagle mix",
     "dog ate chocolate"),
    ("27f got my flu shot 3 days ago and now theres a small tender lump in my armpit",
     "after a vaccine"),
    ("got the shingrix shot yesterday and my arm is killing me + chills", "after a vaccine"),
    ("how many days on amoxicillin before strep isnt contagious, my kid has a party saturday",
     "strep and contagious"),
    ("can i have one beer on doxycycline or is that dumb", "alcohol and antibiotics"),
    ("jake says you can sweat out a fever in a sauna and im saying hes an idiot",
     "sweating out a fever"),
    ("can i take benadryl with sertraline 100mg? havent slept properly in like 4 nights",
     "sleep aid on an antidepressant"),
    ("went to a concert saturday and my ears are still ringing and its tuesday. permanent??",
     "ringing after a concert"),
    # reading 29's
    ("my 4 yr old has had diarrhea for 2 days, still drinking juice but he's only peed once",
     "dehydrated child"),
    ("can i take zyrtec and sudafed together? 34f no other meds", "antihistamine and decongestant"),
    ("how long is pink eye contagious for, daughter wants to go back to daycare tmrw",
     "pink eye and daycare"),
    ("my cat keeps sneezing, been like a week now. eating fine, 3 yrs old", "sneezing cat"),
    ("heartburn almost every night for a month, tums barely work. is it ok to take omeprazole",
     "heartburn and omeprazole"),
    ("toddler ate a glob of toothpaste, like way more than pea size. fine right?",
     "swallowed toothpaste"),
    ("how long after food poisoning can i eat normal food again, day 3",
     "eating after a stomach bug"),
    ("i wake up with a white coating on my tongue every morning", "white tongue"),
    # reading 30's
    ("my husband (52) has had bad indigestion for about an hour, hes sweaty and his jaw aches",
     "heart attack as indigestion"),
    ("can i take loratadine while breastfeeding? baby is 3 months", "medicine while breastfeeding"),
    ("my lab (6yo) keeps licking his front paws till theyre raw and red", "dog licking paws"),
    ("got a tick bite hiking 10 days ago and now theres a red ring around it thats getting bigger",
     "tick bite"),
    ("is it normal that my period cramps make me throw up?? every month",
     "period pain with vomiting"),
    ("my 15 month old got into a dishwasher pod, i think she bit it?? shes coughing a little",
     "detergent pod"),
    ("can i have grapefruit juice with lisinopril", "grapefruit and medicine"),
    ("mum is 70 and has shingles on her forehead right by her eye", "shingles near the eye"),
    ("how long am i contagious w covid, tested positive tuesday", "covid and contagious"),
    # a late period with vomiting is the pregnancy question, not period pain
    ("my period is late and i keep throwing up in the mornings", "vomiting in the morning"),
    # answers for one case, not several (voice pass 3's readers: a hamster's wet tail in a
    # rabbit's answer, a gas bubble in the eye for a flight after knee surgery)
    ("our rabbit hasnt pooped since last night and isnt eating his hay",
     "rabbit or guinea pig off food"),
    ("had retina surgery with a gas bubble last week, can i fly home sunday",
     "a flight after eye surgery"),
    ("14h flight tomorrow, im 3 weeks out from acl surgery and on the pill",
     "a flight after surgery"),
    # reading 31's
    ("my grandma (87) keeps seeing little kids and cats in her room at night",
     "seeing things in old age"),
    ("tattoo is day 6 and peeling like a snake and itchy af, how long till its healed",
     "a healing tattoo"),
    ("dad is 81, on amlodipine 10mg and his ankles have gotten really puffy",
     "ankles on amlodipine"),
    ("29f, 4 UTIs this year, always after sex. is cranberry juice doing anything",
     "UTIs after sex"),
    ("my wife has been chewing ice nonstop and she's always exhausted", "chewing ice"),
    ("can i take omeprazole and my iron tablets at the same time", "omeprazole and iron"),
    ("why does my dog keep dragging his butt across the carpet", "dog scooting"),
    ("got a hard little bump on the back of my wrist, doesnt hurt", "a bump on the wrist"),
    # reading 32's
    ("bf is 52 and has had heartburn all evening, hes sweaty and his left arm feels heavy",
     "heart attack as indigestion"),
    ("how long does stomach flu last?? day 2 and i cant keep anything down not even water",
     "vomiting"),
    ("does pink eye need antibiotics or does it go away on its own", "pink eye and daycare"),
    ("how long does sertraline take to actually work? 3 weeks in and i feel the same",
     "how long an antidepressant takes"),
    ("my dog keeps shaking his head and scratching his ear, theres brown gunk in there",
     "dog ear infection"),
    ("i sleep like 5 hrs on weeknights and then 11 on weekends to catch up",
     "weekend catch-up sleep"),
    ("29f missed my birth control pill 2 days in a row, do i just double up", "missed pills"),
    ("my 2yo started amoxicillin 5 days ago and now has a blotchy rash all over her belly",
     "rash on amoxicillin"),
]

# Not a complaint of the writer's: House's own, a patient's in the series' words, a denial, a
# question about someone else, no complaint at all.
NOT_NAMED = [
    # a missed blood pressure pill is not the contraceptive answer
    "i forgot my blood pressure pills two days in a row, is that bad?",
    # thanks with the news is not a complaint (readings 29 and 31)
    "thanks man, took my mom to urgent care like you said and it was her gallbladder",
    # an appendix already out is thanks, not a complaint (reading 29)
    "update: went to urgent care like u said and it WAS appendicitis, they took it out this "
    "morning. so thanks i guess",
    "Does your leg still hurt?",
    "He's got a fever and a stiff neck.",
    "I have no fever, just a stiff back? No, nothing.",
    "I think I'm in love with my best friend.",
    "Do you ever get tired of being right?",
    "What do you really think of Cuddy?",
    "It's raining again. I hate Mondays.",
    "I went to the bee exhibition and had a great time.",
    "my cat knocked my phone into the bath this morning. great start to the week",
    "just got home from my first night shift as a nurse and someone threw up on my shoes",
    "I burned the lasagna",
    # the series' lines reading 24's entries must leave alone
    "She's having me sleep on the couch. Just for a few nights.",
    "He turned and got hit by a ball in the park.",
    "Maybe we should go back to the blood thinners, up the dosage.",
    "Only other option is blood thinners.",
]


@pytest.mark.parametrize(("message", "name"), NAMED)
def test_a_complaint_gets_its_differential(message: str, name: str) -> None:
    found = PERSONA.differentials.find(message)
    assert found is not None and found.name == name
    kind, text = canned_reply(PERSONA, message, seed=0)
    assert kind == DIFFERENTIAL and text in found.replies


@pytest.mark.parametrize("message", NOT_NAMED)
def test_what_is_not_the_writers_complaint_gets_no_differential(message: str) -> None:
    assert PERSONA.differentials.find(message) is None
    canned = canned_reply(PERSONA, message, seed=0)
    assert canned is None or canned[0] != DIFFERENTIAL
    assert canned_reply(PERSONA, message, seed=0, topics=False) is None


def test_a_denied_cue_does_not_count() -> None:
    assert PERSONA.differentials.find("I have a stiff neck and a fever.").name == "meningitis"
    assert PERSONA.differentials.find("I have a stiff neck but no fever.") is None
    assert PERSONA.differentials.find("My rash doesn't itch.").name == "skin"


def test_a_jab_comes_first_and_the_setting_turns_differentials_off() -> None:
    assert canned_reply(PERSONA, "???", seed=0)[0] == JAB
    assert canned_reply(PERSONA, "I have a fever and a stiff neck.", seed=0,
                        differentials=False, topics=False) is None


def test_a_conversation_hears_each_answer_before_one_comes_again() -> None:
    message = "My chest hurts."
    found = PERSONA.differentials.find(message)
    assert found is not None and len(found.replies) == 2
    heard: list[str] = []
    for seed in range(len(found.replies)):
        _, text = canned_reply(PERSONA, message, seed, avoid=heard)
        assert text not in heard
        heard.append(text)
    assert canned_reply(PERSONA, message, seed=0, avoid=heard) == (DIFFERENTIAL, heard[0])


def test_every_answer_keeps_the_persona_rules() -> None:
    """Within the sentence cap, in English, not an echo or assistant talk."""
    cap = PERSONA.controls.sentence_cap
    entries = PERSONA.differentials.entries
    assert len(entries) >= 60 and len({d.name for d in entries}) == len(entries)
    for entry in entries:
        for reply in entry.replies:
            assert len(split_sentences(reply)) <= cap, reply
            assert acceptable(reply, "I feel ill."), reply


def test_a_broken_file_names_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text('- name: bad cue\n  when: ["fever & (unclosed"]\n  replies: [Hm.]\n')
    with pytest.raises(ValueError, match="bad cue"):
        load_differentials(path)
    path.write_text("- name: no replies\n  when: [fever]\n  replies: []\n")
    with pytest.raises(ValueError, match="no replies"):
        load_differentials(path)
