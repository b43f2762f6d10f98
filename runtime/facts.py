"""Facts planted in text: the benchmark's planted-fact QA (:func:`plant`) and the synthetic rare facts a
scorer can be trained on (:func:`random_fact`, :func:`plant_random_facts`), so that it learns to keep a
number or a name that the text around it does not predict, and the questions that ask for them
(:func:`random_fact_qa`, :func:`plant_located_facts`: the ``facts`` training objective).

The training facts never use the templates the benchmarks ask about (the bench's "secret code of the
<colour> door", RULER's "special magic number"): a scorer fitted on them would be tuned on the test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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
#: For each of :data:`TEMPLATES`, in order: the question that asks for the fact and the answer that gives it.
QUESTIONS = (
    ("What is {name}'s locker combination?", "{name}'s locker combination is {digits}."),
    (
        "When and from which pier does the ferry to {place} leave?",
        "The ferry to {place} leaves at {time} from pier {small}.",
    ),
    ("What is the password for the {thing}?", "The password for the {thing} is {word}."),
    ("How much did {name} pay for the {thing}, and when?", "In {year}, {name} paid {digits} crowns for the {thing}."),
    ("Where was the {thing} hidden?", "The {thing} was hidden in room {small} of the hotel in {place}."),
    ("When was {name} born?", "{name} was born on {month} {day}, {year}."),
    ("Where does {name} keep the spare key?", "{name} keeps the spare key under the {thing} in {place}."),
    ("What is {name}'s phone number, and when should I call?", "Call {name} on {phone} after {time}."),
    ("What is the number of the account at the {place} bank?", "The account at the {place} bank is number {digits}."),
    ("At which gate does flight {code} to {place} board?", "Flight {code} to {place} boards at gate {small}."),
    ("What did {name} name the dog?", "{name} named the dog {word}, after a village near {place}."),
    (
        "How much does the parcel for {name} weigh, and how is it marked?",
        "The parcel for {name} weighs {small} kilograms and is marked {code}.",
    ),
    ("Which inventory entry is {name}'s {thing}?", "Inventory entry {digits}: one {thing}, property of {name}."),
    ("When is the meeting with {name}?", "The meeting with {name} moved to {month} {day} at {time}."),
)


@dataclass(frozen=True)
class Fact:
    """A synthetic fact: the statement planted in the text, a question about it and the answer."""

    statement: str
    question: str
    answer: str


def _digits(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(low, high))).lstrip("0") or "7"


def random_fact(rng: random.Random) -> str:
    """One synthetic fact: a random template of :data:`TEMPLATES` with random names, places, numbers
    (3-8 digits), dates, times and made-up words."""
    return random_fact_qa(rng).statement


def random_fact_qa(rng: random.Random) -> Fact:
    """:func:`random_fact` (the same draws from ``rng``, so the same statement) with its question and answer."""
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
    template = rng.choice(TEMPLATES)
    question, answer = QUESTIONS[TEMPLATES.index(template)]
    return Fact(template.format(**values), question.format(**values), answer.format(**values))


def fact_ids(tokenizer, fact: str) -> list[int]:
    """The tokens :func:`plant` inserts for ``fact``: the statement on a line of its own."""
    return tokenizer(f"\n{fact}\n", add_special_tokens=False).input_ids


def plant(tokenizer, window: list[int], depth: float, fact: str) -> list[int]:
    """``window`` with the tokens of ``fact`` (on a line of its own) inserted at ``depth`` (0 = start,
    1 = end), same length: the window's last tokens make room."""
    inserted = fact_ids(tokenizer, fact)
    keep = len(window) - len(inserted)
    if keep < 1:
        raise ValueError(f"the fact ({len(inserted)} tokens) does not fit a {len(window)}-token context")
    text = window[:keep]
    at = round(depth * keep)
    return text[:at] + inserted + text[at:]


def plant_random_facts(tokenizer, ids: list[int], count: int, rng: random.Random) -> list[int]:
    """``ids`` with ``count`` facts of :func:`random_fact` planted at random depths (as :func:`plant`
    does, so the segment keeps its length); ``ids`` unchanged when ``count`` is 0."""
    return plant_located_facts(tokenizer, ids, count, rng)[0]


def plant_located_facts(
    tokenizer, ids: list[int], count: int, rng: random.Random
) -> tuple[list[int], list[tuple[Fact, int]]]:
    """:func:`plant_random_facts` (the same draws, the same tokens) and, for each planted fact still whole
    in the result (a later one can push an earlier one off the end), the fact and where its tokens start."""
    facts = []
    for _ in range(count):
        depth, fact = rng.random(), random_fact_qa(rng)
        try:
            ids = plant(tokenizer, ids, depth, fact.statement)
        except ValueError as err:
            raise ValueError(f"--plant-facts: {err}; use a longer --segment-size") from None
        facts.append(fact)
    located = []
    for fact in facts:
        start = _find(ids, fact_ids(tokenizer, fact.statement))
        if start is not None:
            located.append((fact, start))
    return ids, located


def _find(ids: list[int], part: list[int]) -> int | None:
    for start in range(len(ids) - len(part) + 1):
        if ids[start : start + len(part)] == part:
            return start
    return None
