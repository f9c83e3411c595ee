#!/usr/bin/env python3
"""Generate data/passkey.jsonl: a long-context passkey retrieval prompt set.

Each of the 8 prompts is a haystack of more than 2,000 words of irrelevant
filler (shuffled and repeated from a fixed pool of hand-written sentences),
with a single "pass key" sentence inserted at a different depth per prompt
(about 11%, 22%, ..., 89% of the way through the filler). The model is asked
to report the pass key at the end.

The output is fully deterministic: all randomness comes from
random.Random(seed), so running the script again with the same seed
reproduces byte-identical output. Standard library only.

Usage:
    python3 data/make_passkey.py [--seed 1234] [--out data/passkey.jsonl]
"""

import argparse
import json
import os
import random

NUM_PROMPTS = 8
MIN_FILLER_WORDS = 2200
DEFAULT_SEED = 1234

INTRO = ("There is important information hidden inside a lot of irrelevant text. "
         "Find it and memorize it.")
QUESTION = "What is the pass key? Answer with the number only."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."

FILLER = [
    "The morning market opens early, and the first stalls usually sell bread, eggs and fresh flowers.",
    "Many old bridges were built from stone because it lasts far longer than wood in wet weather.",
    "A cup of tea tastes different depending on the temperature of the water and how long the leaves steep.",
    "Some birds travel thousands of kilometres every year, following the same routes their ancestors used.",
    "The library on the corner keeps its newspapers on long wooden racks near the reading room windows.",
    "In autumn the leaves of maple trees turn red and orange before they finally fall to the ground.",
    "Most bicycles need their chains cleaned and oiled a few times a year to keep running smoothly.",
    "The river widens as it approaches the sea, and the water becomes slightly salty near the estuary.",
    "A good pair of walking shoes can make a long day of sightseeing much more pleasant.",
    "Bees visit flowers to collect nectar, and in doing so they carry pollen from one plant to another.",
    "The town hall clock has been repaired several times, but it still runs a few minutes slow in winter.",
    "Children in the neighbourhood often play football in the small park after school.",
    "Granite is a hard rock formed when molten material cools slowly deep beneath the surface of the earth.",
    "The bus to the city centre comes every twenty minutes during the day and less often at night.",
    "Cooking onions slowly over a low heat brings out their natural sweetness.",
    "Lighthouses once relied on oil lamps, but today most of them use electric lights that switch on automatically.",
    "The museum has a large collection of pottery, some of it found during the construction of the new railway.",
    "Snow falls more often in the mountains because the air becomes colder as it rises.",
    "A small garden can produce a surprising amount of vegetables if the soil is rich and well watered.",
    "The old harbour is quiet now, although fishing boats still leave before dawn on most days.",
    "Paper was once made by hand from rags, and each sheet was dried on a line like laundry.",
    "Owls hunt mainly at night, using their sharp hearing to find mice moving through the grass.",
    "The bakery down the street is famous for its cinnamon rolls, which sell out before noon.",
    "Glaciers move very slowly, carving valleys into the landscape over thousands of years.",
    "A map is only useful if you know which way is north and where you are standing.",
    "The café keeps a shelf of second-hand books that customers are free to borrow or exchange.",
    "Whales communicate with long, low sounds that can travel great distances under water.",
    "In many countries the evening meal is the largest of the day and is eaten together as a family.",
    "The train slowed down as it climbed the hill, and passengers could see the lake below.",
    "Wool keeps people warm even when it is damp, which is why it was popular with sailors.",
    "The gardener planted tulip bulbs in the autumn so that they would bloom early in the spring.",
    "Thunder is the sound made by the rapid expansion of air heated by a flash of lightning.",
    "A well-organised desk makes it easier to find things and to concentrate on the task at hand.",
    "The village holds a small festival every summer with music, dancing and long tables of food.",
    "Copper turns green over time when it reacts with moisture and gases in the air.",
    "Most people find it easier to learn a new language by speaking it every day, even a little.",
    "The cat slept in a patch of sunlight on the kitchen floor for most of the afternoon.",
    "Deserts can be very hot during the day and surprisingly cold at night because dry air holds little heat.",
    "The post office sorts letters by postcode before sending them out with the delivery vans.",
    "A sharp knife is actually safer in the kitchen than a dull one, because it slips less often.",
    "Coral reefs are built over many years by tiny animals that form hard skeletons of limestone.",
    "The hikers stopped by the stream to refill their water bottles and rest their legs.",
    "Old photographs often fade when they are left in direct sunlight for too long.",
    "The orchestra tuned their instruments while the audience slowly found their seats.",
    "Moss tends to grow on the shady side of rocks and trees, where the surface stays moist.",
    "Farmers rotate their crops from year to year to keep the soil healthy and reduce pests.",
    "The city park has a pond where ducks gather, hoping that visitors will share their bread.",
    "A compass needle points north because it lines up with the magnetic field of the earth.",
    "Rain gardens collect water from roofs and pavements and let it soak slowly into the ground.",
    "The carpenter measured the board twice before cutting it, just to be sure.",
    "Some trees can live for many centuries, growing a new ring in their trunk every year.",
    "Fresh herbs such as basil and parsley lose their flavour quickly once they are dried.",
    "The ferry crosses the bay several times a day, carrying cars, bicycles and foot passengers.",
    "Volcanoes can remain quiet for hundreds of years before erupting again without much warning.",
    "The teacher wrote the date on the board and asked the class to open their notebooks.",
    "Clouds form when warm, moist air rises and cools until the water vapour condenses into droplets.",
    "An umbrella left by the door is a sure sign that someone expects rain later in the day.",
    "The small shop on the square repairs watches, clocks and the occasional old radio.",
    "Salt was once so valuable that it was traded over long distances and used to preserve food for winter.",
    "The sun set behind the hills, and the streetlights came on one by one along the avenue.",
]


def build_haystack(rng, min_words):
    """Return a list of filler sentences totalling at least min_words words."""
    sentences = []
    words = 0
    while words < min_words:
        batch = FILLER[:]
        rng.shuffle(batch)
        for s in batch:
            sentences.append(s)
            words += len(s.split())
            if words >= min_words:
                break
    return sentences


def make_prompt(rng, depth, key):
    sentences = build_haystack(rng, MIN_FILLER_WORDS)
    pos = round(depth * len(sentences))
    sentences.insert(pos, NEEDLE.format(key=key))
    # Group sentences into paragraphs of 6 to 10 sentences for a natural look.
    paragraphs = []
    i = 0
    while i < len(sentences):
        n = rng.randint(6, 10)
        paragraphs.append(" ".join(sentences[i:i + n]))
        i += n
    body = "\n\n".join(paragraphs)
    return INTRO + "\n\n" + body + "\n\n" + QUESTION


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--out", default=os.path.join(here, "passkey.jsonl"))
    args = ap.parse_args()

    rng = random.Random(args.seed)
    keys = rng.sample(range(10000, 100000), NUM_PROMPTS)
    depths = [(i + 1) / (NUM_PROMPTS + 1) for i in range(NUM_PROMPTS)]

    with open(args.out, "w", encoding="utf-8") as f:
        for depth, key in zip(depths, keys):
            prompt = make_prompt(rng, depth, key)
            record = {"conversations": [{"role": "user", "content": prompt}]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {NUM_PROMPTS} prompts to {args.out} (seed={args.seed})")


if __name__ == "__main__":
    main()
