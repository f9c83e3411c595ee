#!/usr/bin/env python3
"""Generate long-context prompt sets whose answers depend on information spread through the context.

Six task families, each a dataset of the same name (8 prompts by default):

    needles        several "safe -> combination" needles at different depths; asks for 2-4 of them
    vartrack       chains of assignments (VAR ABCDE = 12345, VAR FGHIJ = ABCDE) hidden in prose; asks which
                   variables hold a value, or the value a variable ends up with
    aggregation    a long bird-sighting log; asks for the three most frequent birds
    multidoc       many short documents about fictional institutions; one of them answers the question
    summarization  the chronicle of a fictional town; asks for a summary of two aspects (no answers)
    code           a long Python module of small functions; asks about one defined far from the end

Every prompt renders, with the target model's chat template and generation prompt exactly as fidbench
renders it (``fidbench.datasets.render``), to at most ``--tokens N`` and at least 97 % of N tokens.
Each line is ``{"conversations": [...], "task": FAMILY, "tokens": N_RENDERED, "answers": [...]}``;
``answers`` are the strings a correct reply must contain (empty for summarization).

All text is written for this project in this file. The output is deterministic: every random choice
comes from ``random.Random`` seeded with a string made of the seed, the family and the prompt index, so
the same arguments give byte-identical files.

Regenerate the committed files for the default model (SmolLM2-135M-Instruct, context 8,192):

    python data/make_long.py --tokens 4000 8000 --out-dir data/long

For a bigger model, pass its directory (or hub id in the local cache) as the tokenizer, e.g.

    python data/make_long.py --tokens 16000 32000 64000 128000 --tokenizer /models/llama --out-dir data/long-llama

One family to one file: ``python data/make_long.py --family code --tokens 4000 --out code-4k.jsonl``.
Lengths below about 2,000 tokens may not be reachable: the window of 3 % must be wider than the
family's smallest unit (a sentence, a log line, a function).
"""

import argparse
import json
import math
import random
import string
import sys
import time
from pathlib import Path

NUM_PROMPTS = 8
DEFAULT_SEED = 1234
MIN_FILL = 0.97  # a prompt renders to between MIN_FILL * N and N tokens

# ---------------------------------------------------------------------------------------------------
# Vocabulary shared by the families. No digits appear in prose, so numeric answers are unique.

FIRST_NAMES = [
    "Ada", "Bruno", "Clara", "Dmitri", "Elif", "Farah", "Gideon", "Hana", "Ivo", "Jonas", "Keiko", "Lena",
    "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sami", "Tomas", "Uma", "Viktor", "Wen", "Yusuf",
    "Zofia", "Amara", "Bianca", "Cyrus", "Dalia", "Emil", "Freya", "Goran", "Hugo", "Iris", "Kofi", "Lucia",
    "Milo", "Noor", "Otto", "Petra",
]
SURNAMES = [
    "Abernathy", "Brennan", "Castell", "Dorsey", "Ellery", "Fairweather", "Greaves", "Holloway", "Ingram",
    "Jessop", "Kettering", "Lindqvist", "Marlow", "Norcott", "Oakes", "Pemberton", "Quarrie", "Rowntree",
    "Sutherland", "Thackeray", "Underhill", "Vance", "Whitcombe", "Yardley", "Ashdown", "Blackwood", "Crane",
    "Dunmore", "Everly", "Fenwick",
]
# Fictional place names are a prefix and a suffix: "Varnholt", "Kelmere", ...
NAME_PREFIXES = [
    "Varn", "Kel", "Ostr", "Bel", "Tam", "Quin", "Hal", "Mor", "Sel", "Dra", "Fen", "Gor", "Lis", "Pen", "Rud",
    "Thorn", "Wex", "Yar", "Cal", "Eld", "Ard", "Brom", "Cor", "Nim",
]
NAME_SUFFIXES = ["holt", "mira", "wick", "dale", "stead", "ford", "mere", "ton", "by", "haven", "more", "burn",
                 "gate", "field", "crest", "ley"]

FILLER = [
    "The morning ferry was late again, so the passengers waited on the pier and watched the gulls.",
    "Old stone walls hold the warmth of the afternoon sun long after the evening has turned cool.",
    "A good bread dough needs time more than effort, and it rises best in a warm, quiet kitchen.",
    "The hill behind the village is covered in heather, which turns purple towards the end of summer.",
    "Most of the shops on the high street close for an hour at lunchtime, as they have always done.",
    "A heavy frost had silvered the fields, and the cows stood close together by the gate.",
    "The librarian kept a list of overdue books but rarely had the heart to send out reminders.",
    "Rain drummed on the tin roof of the shed while the chickens sheltered underneath it.",
    "The walking trail follows the old railway line, which closed long before anyone now living was born.",
    "Fresh paint and new curtains made the small cottage look almost unrecognisable.",
    "In the square, an old man was teaching his granddaughter how to play chess on a folding board.",
    "The smell of woodsmoke drifted down the lane as the first fires of autumn were lit.",
    "The choir practised in the church hall on weekday evenings, and passers-by often stopped to listen.",
    "A narrow staircase led up to the attic, where boxes of letters had been stored for decades.",
    "The baker swore that the secret of his pastry was cold butter and even colder hands.",
    "When the tide goes out, the bay becomes a wide stretch of rippled sand full of shells.",
    "The orchard had not been pruned for years, yet it still produced more apples than anyone could eat.",
    "Bicycles leaned against every railing near the station, some of them rusted beyond repair.",
    "A fox crossed the road at dusk, paused for a moment in the headlights, and vanished into the hedge.",
    "The harbour master knew every boat by the sound of its engine.",
    "Snowdrops are usually the first flowers to appear after winter, often while frost still covers the lawn.",
    "The old school building now houses a pottery studio and a small café.",
    "Someone had chalked a hopscotch grid on the pavement outside the post office.",
    "The wind turned in the night, and by morning the whole valley was wrapped in fog.",
    "Many of the houses on the hill were built by the same family of masons.",
    "The museum's most popular exhibit is a model of the town as it looked in the age of sailing ships.",
    "Swallows return every spring to nest under the eaves of the barn.",
    "The market traders packed up their stalls as the light faded and the street lamps came on.",
    "Reading aloud to children helps them learn the rhythm of a language long before they can read.",
    "The river is shallow enough to wade across in late summer, but it runs fast and deep in spring.",
    "A faded sign above the door still advertised a tailor who had retired many years ago.",
    "The garden centre sells seedlings in trays, and the tomatoes always sell out first.",
    "Clear nights in winter are the coldest, because there are no clouds to keep the warmth in.",
    "The town band rehearses in a room above the fire station.",
    "Some of the oak beams in the old inn are said to have come from a wrecked ship.",
    "Walking the dog along the cliff path in the early morning was the best part of her day.",
    "A kettle whistled in the back room while the shopkeeper counted the change.",
    "The allotments are busiest on weekend mornings, when the gardeners compare their runner beans.",
    "Crows are clever birds that can remember faces and recognise people who have treated them badly.",
    "The bridge was painted green to match the trees that line both banks of the canal.",
    "He kept his tools in a wooden chest that had belonged to his grandfather.",
    "A thin layer of ice covered the puddles, cracking under the boots of children on their way to school.",
    "The lighthouse keeper's cottage has been turned into a small guest house.",
    "Nobody knew exactly how old the yew tree in the churchyard was, but everyone agreed it was ancient.",
    "Homemade jam was sold at the farm gate, with an honesty box for the money.",
    "The night train rattled through the valley, its windows glowing like a string of lanterns.",
    "She learned to knit from her aunt, who could make a scarf in a single evening.",
    "The sea wall was raised after the great storm, and the promenade was rebuilt along the top of it.",
    "Mushrooms appear in the woods after the first autumn rains, and locals guard their best spots jealously.",
    "The carpenter's workshop smelled of sawdust, linseed oil and strong coffee.",
    "On clear days the distant mountains are visible from the top of the bell tower.",
    "The cheese from the valley farms is aged in cool cellars for many months before it is sold.",
    "Every house on the lane had a different coloured front door.",
    "A sudden gust of wind scattered the papers across the courtyard.",
    "The ducks on the mill pond have grown fat on the bread that visitors throw them.",
    "Stars are easier to see from the countryside, far from the glow of the city.",
    "The tram climbs the steep street slowly, ringing its bell at every corner.",
    "A pot of soup simmered on the stove all afternoon, filling the house with the smell of thyme.",
    "Fishermen mend their nets on the quay while they wait for the weather to change.",
    "The village hall hosts a quiz every month, and the same team seems to win every time.",
]
# Templated filler: slots are filled from the lists below, for variety over very long contexts.
FILLER_TEMPLATES = [
    "{person} spent the afternoon {activity} near {place}.",
    "{time}, {person} walked to {place} carrying {object}.",
    "Nobody at {place} could remember who had left {object} by the door.",
    "{time}, {weather} settled over the town and most people stayed indoors.",
    "{person} and {person2} argued politely about the best way to go about {activity}.",
    "The path to {place} was muddy after {weather}, so {person} took the long way round.",
    "{person} once said that {activity} was the most relaxing thing a person could do.",
    "When {weather} arrived, the stallholders near {place} covered their goods with canvas.",
    "{person} found {object} at {place} and asked around until the owner turned up.",
    "{person} keeps {object} on the kitchen shelf, mostly out of habit.",
    "It took {person} most of the morning to finish {activity}, but the result was worth it.",
    "Every so often {person} goes to {place} just to watch the world go by.",
    "{time}, the streets around {place} were unusually quiet.",
    "{person} borrowed {object} from a neighbour and promised to return it by the weekend.",
    "A visitor asked {person} for directions to {place}, and the two of them ended up talking for an hour.",
    "{person} wrote a short note about {activity} and pinned it to the board at {place}.",
    "{person} prefers {activity} to almost anything else on a free afternoon.",
    "{time}, {person} and {person2} met at {place} to share a flask of tea.",
    "The forecast promised {weather}, so {person} put off {activity} until the next day.",
    "{person} still remembers the day {person2} arrived at {place} with {object}.",
    "Since the repairs at {place}, {person} has taken up {activity} again.",
    "{person} left {object} with {person2} for safekeeping and forgot all about it.",
    "{time}, {person} noticed that someone had tidied {place}.",
    "Neither {person} nor {person2} had expected {weather} so late in the season.",
    "Most evenings {person} can be found {activity}, whatever the weather.",
    "{person} learned the trick of {activity} from {person2}, who had learned it from a grandmother.",
    "The noticeboard at {place} asked for volunteers to help with {activity}.",
    "{time}, {person} sat outside {place} with {object} and watched the clouds.",
    "After {weather}, the gutters along the lane outside {place} ran like small streams.",
    "{person} says that {object} is the one thing worth saving from a house fire.",
]
PLACES = [
    "the bakery", "the old mill", "the harbour wall", "the market square", "the library", "the station",
    "the allotments", "the river path", "the bell tower", "the covered market", "the ferry landing",
    "the orchard", "the chapel", "the post office", "the boatyard", "the village green",
]
ACTIVITIES = [
    "repairing a fence", "reading in the shade", "sorting old letters", "painting the shutters",
    "picking blackberries", "mending fishing nets", "tuning a piano", "sketching the rooftops",
    "feeding the ducks", "sweeping the steps", "planting onions", "looking for a lost key", "baking scones",
]
TIMES = [
    "early in the morning", "on a rainy afternoon", "late in the evening", "just after sunrise", "on Sunday",
    "during the summer holidays", "before the first frost", "in the middle of the week", "at dusk",
]
OBJECTS = [
    "a basket of pears", "an old brass lamp", "a wooden chair", "a box of seeds", "a blue umbrella",
    "a letter from abroad", "a jar of honey", "a map of the coast", "a pair of gloves", "a loaf of rye bread",
    "a tin of biscuits", "a folding stool",
]
WEATHER = [
    "a light drizzle", "a cold wind from the north", "thick fog", "bright sunshine", "a sudden hailstorm",
    "a warm breeze", "heavy rain",
]


# ---------------------------------------------------------------------------------------------------
# Helpers


class Stream:
    """The first k items of an endless generator, each generated once and kept, so that every size asks
    for a prefix of the same items (the fit tries several sizes)."""

    def __init__(self, items):
        self._items, self._kept = items, []

    def get(self, i: int):
        while len(self._kept) <= i:
            self._kept.append(next(self._items))
        return self._kept[i]

    def first(self, k: int) -> list:
        if k:
            self.get(k - 1)
        return self._kept[:k]


def person(rng) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"


def place_names() -> list[str]:
    """All fictional place names, in a fixed order (shuffle a copy to draw distinct ones)."""
    return [p + s for p in NAME_PREFIXES for s in NAME_SUFFIXES]


def sentence_case(text: str) -> str:
    return text[0].upper() + text[1:]


def listing(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def deck(rng, items: list):
    """Endless draws from ``items``: the whole list in shuffled rounds, so nothing repeats soon."""
    while True:
        round_ = items[:]
        rng.shuffle(round_)
        yield from round_


def prose(rng):
    """Endless filler sentences: a hand-written one, then a templated one, each from its own deck."""
    templates = deck(rng, FILLER_TEMPLATES)
    for fixed in deck(rng, FILLER):
        yield fixed
        first, second = rng.sample(FIRST_NAMES, 2)
        yield sentence_case(next(templates).format(
            person=first, person2=second, place=rng.choice(PLACES), activity=rng.choice(ACTIVITIES),
            time=rng.choice(TIMES), object=rng.choice(OBJECTS), weather=rng.choice(WEATHER)))


def interleave(filler: list[str], fixed: list[tuple[float, str]]) -> list[str]:
    """``filler`` with each ``(depth, text)`` of ``fixed`` inserted at that fraction of its length."""
    out, start = [], 0
    for depth, text in sorted(fixed):
        pos = round(depth * len(filler))
        out += filler[start:pos] + [text]
        start = pos
    return out + filler[start:]


def paragraphs(sentences: list[str], rng) -> str:
    """Sentences joined into paragraphs of 4 to 9."""
    out = []
    while sentences:
        n = rng.randint(4, 9)
        out.append(" ".join(sentences[:n]))
        sentences = sentences[n:]
    return "\n\n".join(out)


def haystack(key: str, fixed: list[tuple[float, str]]):
    """A builder of prose of k filler sentences with the ``fixed`` sentences at their depths."""
    filler = Stream(prose(random.Random(key + "/filler")))
    return lambda k: paragraphs(interleave(filler.first(k), fixed), random.Random(key + "/paragraphs"))


# ---------------------------------------------------------------------------------------------------
# Families. Each takes a key (seed, family and prompt index as a string, for its random generators),
# the prompt's index and its position (index + 0.5) / prompts in (0, 1), and returns ``build`` (the user
# message made with k filler units, its length growing with k) and the answers.

COLOURS = ["amber", "cobalt", "crimson", "ivory", "jade", "olive", "scarlet", "silver", "teal", "violet"]
ANIMALS = ["falcon", "otter", "heron", "badger", "lynx", "marten", "raven", "stag", "hare", "wolf", "owl"]
NEEDLE_TEMPLATES = [
    "The combination of the {safe} safe is {code}.",
    "Remember this: the {safe} safe opens with the combination {code}.",
    "Whoever needs to open the {safe} safe must enter {code}.",
    "According to the caretaker's notebook, the {safe} safe uses the combination {code}.",
    "The {safe} safe, the one in the cellar, has the combination {code}.",
]


def needles(key: str, index: int, position: float):
    """Five or six safes with seven-digit combinations at spread depths; asks for two to four of them,
    always including the one at this prompt's depth."""
    rng = random.Random(key)
    count, asked = rng.randint(5, 6), rng.randint(2, 4)
    safes = rng.sample([f"{c} {a}" for c in COLOURS for a in ANIMALS], count)
    codes = [str(c) for c in rng.sample(range(1_000_000, 10_000_000), count)]
    fixed = [(0.02 + 0.96 * ((position + j / count) % 1), rng.choice(NEEDLE_TEMPLATES).format(safe=s, code=c))
             for j, (s, c) in enumerate(zip(safes, codes))]
    ask = [0] + rng.sample(range(1, count), asked - 1)
    rng.shuffle(ask)
    intro = ("The text below is a long collection of unrelated notes. Hidden among them are the combinations "
             "of several safes. Read carefully: you will be asked for some of them.")
    question = (f"What are the combinations of {listing([f'the {safes[j]} safe' for j in ask])}? "
                "Answer with one line per safe, in the form 'safe: combination'.")
    body = haystack(key, fixed)
    return (lambda k: f"{intro}\n\n{body(k)}\n\n{question}"), [codes[j] for j in ask]


def variable_names(rng, count: int) -> list[str]:
    """``count`` distinct names of five capital letters."""
    names = []
    while len(names) < count:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    return names


def vartrack(key: str, index: int, position: float):
    """A chain of four to six assignments passing a five-digit value along, and two shorter distractor
    chains, hidden in prose. Even prompts ask which variables hold the value, odd ones the value of the
    chain's last variable."""
    rng = random.Random(key)
    lengths = [rng.randint(4, 6), rng.randint(2, 4), rng.randint(2, 4)]
    names = variable_names(rng, sum(lengths))
    values = [str(v) for v in rng.sample(range(10_000, 100_000), 3)]
    fixed, chains = [], []
    for c, (length, value) in enumerate(zip(lengths, values)):
        chain, names = names[:length], names[length:]
        chains.append(chain)
        if c == 0:  # the asked chain spans half the text, starting at a depth that varies with the prompt
            depths = [position / 2 + 0.5 * j / (length - 1) for j in range(length)]
        else:
            depths = sorted(rng.uniform(0.02, 0.98) for _ in range(length))
        sources = [value] + chain[:-1]
        fixed += [(d, f"VAR {name} = {source}.") for d, name, source in zip(depths, chain, sources)]
    intro = ("Memorize the variable assignments hidden in the text below. Each has the form VAR NAME = VALUE, "
             "where the value is a number or the name of another variable whose value is copied.")
    if index % 2 == 0:
        question = (f"Which variables are assigned the value {values[0]}, either directly or by copying another "
                    "variable? List all of their names.")
        answers = chains[0]
    else:
        question = (f"What is the value of the variable {chains[0][-1]}? Follow its assignments back to a number "
                    "and answer with that number.")
        answers = [values[0]]
    body = haystack(key, fixed)
    return (lambda k: f"{intro}\n\n{body(k)}\n\n{question}"), answers


BIRDS = [
    "robin", "wren", "kestrel", "heron", "curlew", "lapwing", "plover", "sandpiper", "kingfisher", "nuthatch",
    "goldfinch", "chaffinch", "swallow", "swift", "magpie", "jackdaw", "rook", "raven", "starling", "skylark",
    "linnet", "bunting", "warbler", "blackcap", "treecreeper", "woodpecker", "cuckoo", "cormorant", "grebe",
    "moorhen", "coot", "wigeon", "gadwall", "shoveler", "pochard", "osprey", "buzzard", "harrier", "dunnock",
    "redstart", "fieldfare", "siskin",
]
LAKES = ["Marrow Lake", "Fenwater", "the Sallow reservoir", "Ebbing Mere", "Coldharbour Marsh", "Tarnside"]


def split(total: int, weights: list[float]) -> list[int]:
    """``total`` divided in proportion to ``weights``, in whole numbers (the remainder to the first ones)."""
    counts = [math.floor(total * w / sum(weights)) for w in weights]
    for j in range(total - sum(counts)):
        counts[j] += 1
    return counts


def aggregation(key: str, index: int, position: float):
    """A shuffled sighting log of k + 12 lines over about thirty birds; asks for the three seen most often.
    Their shares are 2, 1.7 and 1.4 against at most 1 for the others, and their head start of 6, 4 and 2
    sightings keeps the order strict in short logs too (split's rounding moves a count by at most one)."""
    rng = random.Random(key)
    birds = rng.sample(BIRDS, rng.randint(30, 36))
    weights = [2.0, 1.7, 1.4] + [rng.uniform(0.4, 1.0) for _ in birds[3:]]
    head_start = [6, 4, 2] + [0] * len(birds[3:])
    intro = (f"The birdwatching club of {rng.choice(LAKES)} keeps a log with one line for every bird a member "
             "sees. Here is this season's log:")
    question = "Which three birds appear most often in the log? Name them from the most to the least frequent."

    def build(k):
        counts = [n + extra for n, extra in zip(split(k, weights), head_start)]
        lines = [bird for bird, n in zip(birds, counts) for _ in range(n)]
        random.Random(key + "/order").shuffle(lines)
        log = "\n".join(f"{i}. {bird}" for i, bird in enumerate(lines, 1))
        return f"{intro}\n\n{log}\n\n{question}"

    return build, birds[:3]


KINDS = {
    "observatory": ["its catalogue of comets", "a brass telescope built by hand", "public evenings of stargazing"],
    "bakery": ["rye loaves baked in a wood oven", "its honey cakes", "a sourdough culture kept for generations"],
    "shipyard": ["fishing boats of larch wood", "its river barges", "the restoration of old sailing ships"],
    "museum": ["a collection of clocks", "maps of the old coastline", "costumes from village weddings"],
    "brewery": ["a dark ale brewed with smoked malt", "cider from local apples", "a pale beer made with heather"],
    "weaving mill": ["blankets of undyed wool", "linen for sails", "patterned rugs"],
    "glassworks": ["blue bottles", "stained glass windows", "lenses for spectacles"],
    "theatre": ["comedies written by local authors", "puppet shows for children", "a winter season of operetta"],
    "printing house": ["its almanacs", "illustrated books of birds", "the town's weekly newspaper"],
    "botanical garden": ["a glasshouse of ferns", "rare alpine flowers", "an avenue of old lime trees"],
    "ferry company": ["crossings in any weather", "an old paddle steamer", "night services to the islands"],
    "pottery": ["glazed jugs", "roof tiles", "stoneware plates"],
}
TOWNS = ["Ashbury", "Brackenford", "Coldwater", "Dunhallow", "Eastmere", "Foxcombe", "Greystow", "Hartwell",
         "Ivybridge Cross", "Juniper Bay", "Kingsmoor", "Larkhill", "Millbrook", "Northwold", "Oldcastle",
         "Pinecliff", "Redmarsh", "Stonehaven", "Thistledown", "Westering"]
LANDMARKS = ["harbour", "old bridge", "railway station", "cathedral", "market hall", "river mouth", "castle ruins"]
FOUNDED = [
    "{Entity} was founded in {year} by {founder}.",
    "{founder} established {entity} in {year}.",
    "{Entity} dates back to {year}, when {founder} opened its doors.",
]
TOWN = [
    "It stands in {town}, not far from the {landmark}.",
    "The {kind} is located in the town of {town}.",
    "You will find it in {town}, on the road to the {landmark}.",
]
DIRECTOR = [
    "Its current director is {director}.",
    "Today it is run by {director}.",
    "{director} has been in charge of it since the last renovation.",
]
EXTRAS = [
    "It is best known for {specialty}.",
    "It employs about {staff} people.",
    "The building was once a {former}.",
    "Every {season} it opens its doors to the public for a weekend.",
    "Its archive is said to be one of the best kept in the region.",
    "A portrait of {founder} still hangs above the entrance.",
]
FORMER = ["grain store", "customs house", "school", "chapel", "stable", "warehouse", "coaching inn"]
SEASONS = ["spring", "summer", "autumn", "winter"]
QUESTIONS = {
    "founder": "Who founded {entity}? Answer with the name only.",
    "year": "In which year was {entity} founded? Answer with the year only.",
    "town": "In which town is {entity}? Answer with the town only.",
    "director": "Who is the current director of {entity}? Answer with the name only.",
}


def facts(rng) -> dict:
    """The fields a multidoc question may ask about."""
    return {"founder": person(rng), "year": rng.randint(1650, 1990), "town": rng.choice(TOWNS),
            "director": person(rng)}


def document(rng, name: str, kind: str, extras: int, stated: dict | None = None) -> tuple[str, list[str]]:
    """A document about the ``kind`` called ``name``: its title and its sentences, the founding first.
    With ``stated`` facts it also states the town and the director, then ``extras`` other sentences;
    without, ``extras`` sentences drawn from all the others (its facts are random)."""
    entity = f"the {name} {kind.title()}"
    fields = dict(facts(rng), entity=entity, Entity=sentence_case(entity), kind=kind,
                  landmark=rng.choice(LANDMARKS), specialty=rng.choice(KINDS[kind]), staff=rng.randint(5, 300),
                  former=rng.choice(FORMER), season=rng.choice(SEASONS), **(stated or {}))
    town_director = [rng.choice(TOWN), rng.choice(DIRECTOR)]
    if stated:
        chosen = town_director + rng.sample(EXTRAS, extras)
    else:
        chosen = rng.sample(town_director + EXTRAS, extras)
    rng.shuffle(chosen)
    return f"{name} {kind.title()}", [sentence_case(t.format(**fields)) for t in [rng.choice(FOUNDED)] + chosen]


def multidoc(key: str, index: int, position: float):
    """Short documents about fictional institutions; the target sits at this prompt's depth, and two
    distractors of the same structure (one with the same name, one of the same kind) elsewhere. The
    question (founder, year, town or director, by prompt index) names the target."""
    rng = random.Random(key)
    entities = [(n, k) for n in place_names() for k in KINDS]
    rng.shuffle(entities)
    (name, kind), asked = entities[0], list(QUESTIONS)[index % len(QUESTIONS)]
    near = [next(e for e in entities if e[0] == name and e[1] != kind),
            next(e for e in entities if e[0] != name and e[1] == kind)]
    truth = facts(rng)
    fixed = [(position, document(rng, name, kind, rng.randint(1, 2), truth))]
    for entity in near:
        stated = facts(rng)
        while stated[asked] == truth[asked]:
            stated = facts(rng)
        fixed.append((rng.uniform(0.02, 0.98), document(rng, *entity, rng.randint(1, 2), stated)))
    pool = Stream(document(rng, n, k, rng.randint(2, 4)) for n, k in entities[1:] if (n, k) not in near)
    intro = "Below are short documents from a regional archive. Read them and answer the question at the end."
    question = "Question: " + QUESTIONS[asked].format(entity=f"the {name} {kind.title()}")

    def build(k):
        """The documents holding k filler sentences in all (the last one cut short), and the fixed ones."""
        docs, left = [], k
        while left > 0:
            title, sentences = pool.get(len(docs))
            docs.append((title, sentences[:left]))
            left -= len(sentences)
        docs = interleave(docs, fixed)
        text = "\n\n".join(f"Document {i}: {title}\n{' '.join(s)}" for i, (title, s) in enumerate(docs, 1))
        return f"{intro}\n\n{text}\n\n{question}"

    return build, [str(truth[asked])]


RIVERS = ["Lessing", "Ambre", "Tolva", "Wend", "Sile", "Corran", "Eddle", "Brisk"]
SITES = ["the market square", "the quay", "Mill Lane", "the east bridge", "the churchyard", "the upper town",
         "the riverside meadows", "Tanner Street", "the north gate", "the harbour road"]
TRADES = ["miller", "blacksmith", "weaver", "cooper", "potter", "tanner", "baker", "ropemaker", "glassblower",
          "carpenter"]
BUILDINGS = ["library", "clock tower", "bathhouse", "covered market", "granary", "hospital", "theatre",
             "schoolhouse", "town hall", "almshouse"]
GOODS = ["wool", "timber", "salt", "cider", "linen", "pottery", "leather", "slate", "grain", "cheese"]
CROPS = ["barley", "apples", "hops", "rye", "turnips", "pears"]
FESTIVALS = ["lantern festival", "harvest fair", "river regatta", "midsummer market", "apple feast"]
NEIGHBOURS = ["Hollin", "Carrow", "Denby Vale", "Ostermere", "Saltgrave", "Wyndham"]
RULES = ["the keeping of pigs inside the walls", "the hours of the market", "the width of new streets",
         "the lighting of fires in thatched houses", "fishing rights on the river"]
PETITIONS = ["lower the bridge toll", "build a new well in the upper town", "keep the market open on Sundays",
             "pave the road to the mill", "hire a second night watchman"]
COUNTS = ["two", "three", "four", "five", "six", "seven", "eight"]
# The chronicle's events by the aspect a summary is asked about, with its wording in the instruction.
ASPECTS = {
    "how its trade and crafts developed": [
        "{person}, a {trade} from {neighbour}, opened a workshop near {site} and soon took on two apprentices.",
        "The price of {good} rose sharply after a poor harvest, and several merchants moved to {neighbour}.",
        "A new road to {neighbour} was finished, and carts loaded with {good} began to pass through every week.",
        "The {trade}s of the town formed a guild and elected {person} as its first master.",
        "{person} began shipping {good} down the {river} by barge, the first trade of its kind in the town.",
        "The weekly market was moved to {site} because the old square had become too crowded.",
        "A dispute between the {trade}s and the merchants of {neighbour} over the price of {good} was settled.",
    ],
    "the floods, fires and other disasters it suffered": [
        "The {river} burst its banks after weeks of rain, flooding the cellars along {site}.",
        "A fire that started in a {trade}'s workshop destroyed {count} houses before it was put out.",
        "A severe winter froze the {river} solid, and {good} had to be brought in by sledge.",
        "A storm tore the roof from the {building}, and repairs took the rest of the year.",
        "An outbreak of fever closed the school and the market for most of the season.",
        "A drought ruined the {crop}, and the town had to buy grain from {neighbour}.",
    ],
    "who governed the town and how its leaders changed": [
        "{person} was elected mayor, promising to repair the roads and lower the bridge toll.",
        "After a long dispute, the council voted to remove {person} from the office of treasurer.",
        "{person} stepped down as mayor after {count} years and was succeeded by {person2}.",
        "The council passed a law on {rule}, proposed by {person}.",
        "A petition signed by most of the {trade}s persuaded the council to {petition}.",
        "{person} was appointed town clerk, an office held by the same family for generations.",
    ],
    "the buildings and public works it gained": [
        "Work began on a stone bridge across the {river}, paid for by a tax on {good}.",
        "A new {building} opened near {site}, designed by {person}.",
        "The old {building} was pulled down to make room for a wider street.",
        "Lanterns were hung around {site}, and a lamplighter was hired to tend them.",
        "The town wall was repaired, and a new gate was built facing the road to {neighbour}.",
        "{person} paid for a fountain near {site}, which still bears the family's name.",
    ],
    "its festivals, arts and cultural life": [
        "The first {festival} was held on {site}, with music, dancing and a contest for the best {crop}.",
        "A travelling theatre company stayed for a month and performed in the courtyard of the inn.",
        "{person} published a book of poems about the {river}, which was read aloud at the {festival}.",
        "The town choir won a prize at a singing competition in {neighbour}.",
        "{person} founded a brass band that played on the quay every Sunday in summer.",
        "A painter from {neighbour} spent the summer in the town and left {count} views of {site} behind.",
    ],
}
CONNECTORS = ["", "", "", "", "", "Later that year, ", "The same year, ", "Around the same time, ", "Soon afterwards, ",
              "Meanwhile, "]


def chronicle(rng, river: str):
    """Endless events in time order as ``(opens_a_year, sentence)``; the first event of each year opens a
    paragraph with "In <year>, ". A year holds about five events, so 128k tokens span some ten centuries."""
    year, new_year = rng.randint(750, 900), True
    for template in deck(rng, [t for templates in ASPECTS.values() for t in templates]):
        lead = f"In {year}, " if new_year else rng.choice(CONNECTORS)
        if lead and not template.startswith("{"):
            template = template[0].lower() + template[1:]
        first, second = rng.sample(FIRST_NAMES, 2)
        yield new_year, sentence_case((lead + template).format(
            person=f"{first} {rng.choice(SURNAMES)}", person2=f"{second} {rng.choice(SURNAMES)}",
            trade=rng.choice(TRADES), neighbour=rng.choice(NEIGHBOURS), site=rng.choice(SITES),
            good=rng.choice(GOODS), river=river, count=rng.choice(COUNTS), building=rng.choice(BUILDINGS),
            crop=rng.choice(CROPS), rule=rng.choice(RULES), petition=rng.choice(PETITIONS),
            festival=rng.choice(FESTIVALS)))
        new_year = rng.random() < 0.2
        year += new_year


def summarization(key: str, index: int, position: float):
    """The chronicle of a fictional town, k events long; asks for a summary of two of its aspects."""
    rng = random.Random(key)
    town, river = rng.choice(place_names()), rng.choice(RIVERS)
    aspects = rng.sample(list(ASPECTS), 2)
    events = Stream(chronicle(random.Random(key + "/events"), river))
    intro = f"Below is the chronicle of {town}, a small town on the river {river}, as kept by its archivists."
    question = (f"Summarize the chronicle of {town} in one paragraph, focusing on {aspects[0]} and on "
                f"{aspects[1]}.")

    def build(k):
        text = "".join(("\n\n" if opens else " ") + sentence for opens, sentence in events.first(k))
        return f"{intro}\n\nThe Chronicle of {town}{text}\n\n{question}"

    return build, []


VERBS = ["scale", "adjust", "compute", "estimate", "convert", "clamp", "round", "merge", "count", "weigh",
         "price", "score", "rank", "total", "check", "normalize", "limit", "offset", "split", "pack"]
ADJECTIVES = ["gross", "net", "daily", "weekly", "late", "early", "spare", "bulk", "local", "export", "cold",
              "dry", "raw", "base", "peak"]
NOUNS = ["freight", "orders", "crates", "pallets", "invoices", "tariff", "stock", "returns", "parcels", "fuel",
         "wages", "rent", "discount", "deposit", "yield", "margin", "shipments", "labels", "routes", "tolls",
         "loads", "batches", "samples", "readings", "hours", "shifts", "repairs", "claims", "fees", "credits",
         "refunds", "quotas", "levels", "rations", "barrels", "bales", "sacks", "drums", "reels", "bins"]
DOCSTRINGS = ["{Verb} the {adj} {noun}.", "{Verb} the {adj} {noun} of one record.",
              "Helper for the depot report: {verb} the {adj} {noun}.", "{Verb} the {adj} {noun} before saving."]
CONSTANT_SUFFIXES = ["LIMIT", "RATE", "FACTOR", "SIZE", "COUNT"]


def docstring(rng, name: str) -> str:
    """A one-line docstring made from a function name "verb_adjective_noun"."""
    verb, adj, noun = name.split("_")
    return rng.choice(DOCSTRINGS).format(Verb=verb.capitalize(), verb=verb, adj=adj, noun=noun)


def number(rng, avoid: int) -> int:
    """A number from 2 to 999 other than ``avoid``."""
    n = rng.randint(2, 999)
    return n if n != avoid else number(rng, avoid)


def affine(name: str, doc: str, factor: int, offset: int) -> str:
    return f'def {name}(x):\n    """{doc}"""\n    return x * {factor} + {offset}'


def threshold(name: str, doc: str, limit: int, below: int, above: int) -> str:
    return (f'def {name}(x, limit={limit}):\n    """{doc}"""\n    if x > limit:\n        return limit - {below}\n'
            f'    return x + {above}')


def accumulate(name: str, doc: str, start: int, modulus: int) -> str:
    return (f'def {name}(values):\n    """{doc}"""\n    total = {start}\n    for value in values:\n'
            f'        total += value % {modulus}\n    return total')


def delegate(name: str, doc: str, callee: str, factor: int) -> str:
    return f'def {name}(x, y):\n    """{doc}"""\n    return {callee}(x) - y * {factor}'


def definitions(rng, names, constants, avoid: int):
    """Endless top-level definitions: constants and functions of four shapes, with numbers from 2 to 999
    other than ``avoid`` (the answer's). A ``delegate`` calls one of the last fifty one-argument functions."""
    callable_ = []
    for name in names:
        shape = rng.random()
        if shape < 0.12:
            yield f"{next(constants)} = {number(rng, avoid)}"
            continue
        doc = docstring(rng, name)
        if shape < 0.4 or not callable_:
            callable_.append(name)
            yield affine(name, doc, number(rng, avoid), number(rng, avoid))
        elif shape < 0.6:
            callable_.append(name)
            yield threshold(name, doc, number(rng, avoid), rng.randint(2, 99), number(rng, avoid))
        elif shape < 0.8:
            yield accumulate(name, doc, number(rng, avoid), number(rng, avoid))
        else:
            yield delegate(name, doc, rng.choice(callable_[-50:]), number(rng, avoid))


def code(key: str, index: int, position: float):
    """A Python module of k definitions; the target function sits between 9 % and 71 % of the way in. By
    prompt index the question asks its multiplier, its parameter's default, or the function it calls
    (defined at half the target's depth); numeric answers are three-digit numbers used nowhere else."""
    rng = random.Random(key)
    names = [f"{v}_{a}_{n}" for v in VERBS for a in ADJECTIVES for n in NOUNS]
    constants = [f"{a}_{n}_{s}".upper() for a in ADJECTIVES for n in NOUNS for s in CONSTANT_SUFFIXES]
    rng.shuffle(names)
    rng.shuffle(constants)
    target, callee = names[:2]
    answer = rng.randint(100, 999)
    depth = 0.05 + 0.7 * position
    kind = index % 3
    if kind == 0:
        fixed = [(depth, affine(target, docstring(rng, target), answer, number(rng, answer)))]
        question, answers = f"By which number does `{target}` multiply its argument?", [str(answer)]
    elif kind == 1:
        fixed = [(depth, threshold(target, docstring(rng, target), answer, rng.randint(2, 99), number(rng, answer)))]
        question, answers = f"What is the default value of the `limit` parameter of `{target}`?", [str(answer)]
    else:
        fixed = [(depth / 2, affine(callee, docstring(rng, callee), number(rng, answer), number(rng, answer))),
                 (depth, delegate(target, docstring(rng, target), callee, number(rng, answer)))]
        question, answers = f"Which function does `{target}` call?", [callee]
    pool = Stream(definitions(random.Random(key + "/definitions"), iter(names[2:]), iter(constants), answer))
    module = f'"""Stock and freight helpers of the {rng.choice(place_names())} depot."""'
    intro = "Read the following Python module."

    def build(k):
        source = "\n\n\n".join([module] + interleave(pool.first(k), fixed))
        return f"{intro}\n\n```python\n{source}\n```\n\n{question} Answer briefly."

    return build, answers


FAMILIES = {f.__name__: f for f in (needles, vartrack, aggregation, multidoc, summarization, code)}


# ---------------------------------------------------------------------------------------------------
# Fitting to a token length, generating, writing.


def fit(measure, n_tokens: int) -> tuple[int, int]:
    """The filler size k, and its length, whose prompt is ``measure(k)`` tokens with
    MIN_FILL * n_tokens <= measure(k) <= n_tokens.

    Tokens grow about linearly with k, so each step extrapolates along the secant through the last two
    measurements to the middle of the window (a few full tokenizations per prompt, even at 128k); the
    sizes known to be too short and too long bound the steps, so the search ends.
    """
    low = math.ceil(MIN_FILL * n_tokens)
    aim = (low + n_tokens) / 2
    last = (0, measure(0))
    if last[1] > n_tokens:
        raise ValueError(f"{n_tokens} tokens are too few: the prompt without filler already has {last[1]}")
    short, long = 0, None
    k = 16  # a first probe, for the slope
    while True:
        m = measure(k)
        if low <= m <= n_tokens:
            return k, m
        if m > n_tokens:
            long = k if long is None else min(long, k)
        else:
            short = max(short, k)
        if long is not None and long - short <= 1:
            raise ValueError(f"cannot reach {low}-{n_tokens} tokens: {short} filler units are too few and one more "
                             "too many (this family's units are too coarse for such a short length)")
        slope = (m - last[1]) / (k - last[0])
        last = (k, m)
        k = round(k + (aim - m) / slope) if slope > 0 else -1
        if not short < k < (long if long is not None else math.inf):
            k = (short + long) // 2 if long is not None else 2 * short


def render_length(tokenizer, content: str) -> int:
    """Tokens of a one-turn user prompt as fidbench renders it (chat template and generation prompt)."""
    from fidbench.datasets import render

    return len(render(tokenizer, [{"role": "user", "content": content}], "make_long")[0])


def generate(family: str, tokenizer, n_tokens: int, prompts: int = NUM_PROMPTS, seed: int = DEFAULT_SEED) -> list:
    """The dataset ``family`` as JSONL records of ``prompts`` prompts of at most ``n_tokens`` tokens."""
    records = []
    for i in range(prompts):
        build, answers = FAMILIES[family](f"{seed}/{family}/{i}", i, (i + 0.5) / prompts)
        records.append(record(family, tokenizer, n_tokens, build, answers))
    return records


def record(family: str, tokenizer, n_tokens: int, build, answers: list[str]) -> dict:
    """One JSONL line: the prompt ``build(k)`` of the size k that fits ``n_tokens``."""
    k, length = fit(lambda size: render_length(tokenizer, build(size)), n_tokens)
    return {"conversations": [{"role": "user", "content": build(k)}], "task": family, "tokens": length,
            "answers": answers}


def write_jsonl(records: list, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def label(n_tokens: int) -> str:
    """The file name's length label: 4000 -> "4k", 128000 -> "128k"."""
    return f"{round(n_tokens / 1000)}k"


def load_tokenizer(name: str):
    """The tokenizer of a model directory, a hub id in the local cache, or an embedded model's name."""
    from transformers import AutoTokenizer

    from fidbench.models import resolve

    return AutoTokenizer.from_pretrained(resolve(name))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", required=True, help="prompt length(s) in rendered tokens")
    ap.add_argument("--tokenizer", default="smollm2-135m", help="model directory or embedded model name")
    ap.add_argument("--family", choices=list(FAMILIES), help="one family (default: all)")
    ap.add_argument("--prompts", type=int, default=NUM_PROMPTS)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="one JSONL file (one family, one length)")
    out.add_argument("--out-dir", type=Path, help="writes {family}-{label}.jsonl, e.g. needles-4k.jsonl")
    args = ap.parse_args(argv)
    if args.out and (args.family is None or len(args.tokens) > 1):
        ap.error("--out takes one --family and one --tokens; use --out-dir for several")
    tokenizer = load_tokenizer(args.tokenizer)
    for n_tokens in args.tokens:
        for family in [args.family] if args.family else FAMILIES:
            start = time.perf_counter()
            records = generate(family, tokenizer, n_tokens, args.prompts, args.seed)
            path = args.out or args.out_dir / f"{family}-{label(n_tokens)}.jsonl"
            write_jsonl(records, path)
            lengths = [r["tokens"] for r in records]
            print(f"{path}: {len(records)} prompts of {min(lengths)}-{max(lengths)} tokens "
                  f"({time.perf_counter() - start:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
