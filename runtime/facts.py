"""Facts planted in text: the benchmark's planted-fact QA (:func:`plant`) and the synthetic rare facts a
scorer can be trained on (:func:`random_fact`, :func:`plant_random_facts`), so that it learns to keep a
number or a name that the text around it does not predict.

The training facts never use the templates the benchmarks ask about (the bench's "secret code of the
<colour> door", RULER's "special magic number"): a scorer fitted on them would be tuned on the test.
"""

from __future__ import annotations

import random

# The lists the shipped scorer was trained with (training/scorer-r0.1-head-facts): change them and the recipe
# plants other facts.
_FIRST = tuple(
    "Ada Bram Celia Dmitri Esther Farid Greta Hugo Ines Jonas Kira Lionel Maren Nils Odile Pavel Quentin Rosa "
    "Silas Tamsin Ulric Vera".split()
)
_LAST = tuple(
    "Ashgrove Blackwood Carrow Dunmore Elsworth Fairleigh Greaves Holloway Ingram Kestrel Lindqvist Marchetti "
    "Okafor Pemberton Ravel Szabo Thorne".split()
)
_PLACES = tuple(
    "Ashford Brindisi Corvallis Dunedin Elsinore Fairbanks Galway Harrogate Ithaca Jaffna Kilkenny Lismore "
    "Mombasa Narvik Oporto Tromso Zermatt".split()
)
_THINGS = tuple(
    "ledger, lantern, violin case, tin trunk, sextant, brass clock, green umbrella, walking stick, seed drill, "
    "telescope, hat box, copper kettle, chess set, sea chest".split(", ")
)
_MONTHS = tuple("January February March April May June July August September October November December".split())
_SYLLABLES = ("ka", "lo", "mir", "ven", "tas", "ro", "qui", "zel", "dor", "pha", "nu", "bri", "sto", "ge")

#: Statements of a rare fact: each placeholder is filled by :func:`random_fact`.
TEMPLATES = (
    "{name}'s locker combination is {digits}.",
    "The ferry to {place} leaves at {time} from pier {small}.",
    "The password for the {thing} is {word}.",
    "In {year}, {name} paid {digits} crowns for the {thing}.",
    "The {thing} was hidden in room {small} of the hotel in {place}.",
    "Note: {name} was born on {month} {day}, {year}.",
    "{name} keeps the spare key under the {thing} in {place}.",
    "Call {name} on {phone} after {time}.",
    "The account at the {place} bank is number {digits}.",
    "Flight {code} to {place} boards at gate {small}.",
    "{name} named the dog {word}, after a village near {place}.",
    "The parcel for {name} weighs {small} kilograms and is marked {code}.",
    "Inventory entry {digits}: one {thing}, property of {name}.",
    "The meeting with {name} moved to {month} {day} at {time}.",
)


def _digits(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(low, high))).lstrip("0") or "7"


def random_fact(rng: random.Random) -> str:
    """One synthetic fact: a random template of :data:`TEMPLATES` with random names, places, numbers
    (3-8 digits), dates, times and made-up words."""
    values = {
        "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
        "place": rng.choice(_PLACES),
        "thing": rng.choice(_THINGS),
        "digits": _digits(rng, 3, 8),
        "small": str(rng.randint(2, 999)),
        "year": str(rng.randint(1700, 2030)),
        "month": rng.choice(_MONTHS),
        "day": str(rng.randint(1, 28)),
        "time": f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d}",
        "phone": f"{_digits(rng, 3, 3)}-{rng.randint(0, 9999):04d}",
        "code": f"{rng.choice('ABCDEFGHJKLMNPRSTVWXZ')}{rng.choice('ABCDEFGHJKLMNPRSTVWXZ')}{rng.randint(10, 9999)}",
        "word": "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize(),
    }
    return rng.choice(TEMPLATES).format(**values)


def plant(tokenizer, window: list[int], depth: float, fact: str) -> list[int]:
    """``window`` with the tokens of ``fact`` (on a line of its own) inserted at ``depth`` (0 = start,
    1 = end), same length: the window's last tokens make room."""
    fact_ids = tokenizer(f"\n{fact}\n", add_special_tokens=False).input_ids
    keep = len(window) - len(fact_ids)
    if keep < 1:
        raise ValueError(f"the fact ({len(fact_ids)} tokens) does not fit a {len(window)}-token context")
    text = window[:keep]
    at = round(depth * keep)
    return text[:at] + fact_ids + text[at:]


def plant_random_facts(tokenizer, ids: list[int], count: int, rng: random.Random) -> list[int]:
    """``ids`` with ``count`` facts of :func:`random_fact` planted at random depths (as :func:`plant`
    does, so the segment keeps its length); ``ids`` unchanged when ``count`` is 0."""
    for _ in range(count):
        try:
            ids = plant(tokenizer, ids, rng.random(), random_fact(rng))
        except ValueError as err:
            raise ValueError(f"--plant-facts: {err}; use a longer --segment-size") from None
    return ids
