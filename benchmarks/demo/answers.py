"""Choose the demo's generation settings: answers to questions with known answers, over the demo's text.

Reads the demo's text (the book's first ``--tokens``) with facts planted at three depths into the demo's
nugget cache and into a full KV cache, then answers every question under each candidate setting (each
over a fresh copy of the read text). An answer is correct when it holds every group's keyword (any of
the group); it loops when it says a word 3-gram twice. Regenerate (default model, one thread):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo/answers.py --out benchmarks/demo/answers.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from nugget2d.runtime.demo import DEMO_TOKENS, demo_cache_config, full_cache_config
from nugget2d.runtime.generation import GenerationSettings
from nugget2d.runtime.loading import load_nugget2d
from nugget2d.runtime.session import StreamingSession
from nugget2d.runtime.texts import bundled_text

#: (question, keyword groups): correct when each group has one of its words in the answer.
BOOK = [
    ("Who wrote this book?", [["walton"]]),
    ("Who are the two men talking at the start of the dialogue?", [["piscator"], ["viator", "venator"]]),
    ("Where is Viator going to meet his friends?", [["thatch", "hodsden", "hoddesdon"]]),
    ("What did the first edition of the book cost?", [["18", "eighteen"]]),
    ("Who printed and sold the first edition?", [["marriot"]]),
]
PLANTED = [(0.25, "red", "4821"), (0.5, "green", "7306"), (0.75, "blue", "5194")]
MAX_NEW = 40  # the demo allows 60; 40 shows a loop and keeps the run short on a loaded machine
SETTINGS = {
    "greedy": GenerationSettings(MAX_NEW),
    "rep1.2": GenerationSettings(MAX_NEW, repetition_penalty=1.2),
    "ngram3+blank": GenerationSettings(MAX_NEW, no_repeat_ngram=3, stop=("\n\n",)),
    "rep1.1+ngram4+blank": GenerationSettings(MAX_NEW, repetition_penalty=1.1, no_repeat_ngram=4, stop=("\n\n",)),
    "rep1.2+ngram3+blank": GenerationSettings(MAX_NEW, repetition_penalty=1.2, no_repeat_ngram=3, stop=("\n\n",)),
}


def plant(tokenizer, ids: list[int], facts: list[tuple[float, str, str]]) -> list[int]:
    """``ids`` with each fact's sentence inserted at its depth (0 = start, 1 = end)."""
    out = list(ids)
    for depth, color, code in sorted(facts, reverse=True):  # deepest first: earlier depths keep their place
        at = round(depth * len(ids))
        fact = f"\nThe secret code of the {color} door is {code}.\n"
        out[at:at] = tokenizer(fact, add_special_tokens=False).input_ids
    return out


def loops(answer: str) -> bool:
    """Whether ``answer`` says some word 3-gram twice."""
    words = re.findall(r"\w+", answer.lower())
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(grams) != len(set(grams))


def correct(answer: str, groups: list[list[str]]) -> bool:
    """Whether every keyword group has a word in ``answer``."""
    text = answer.lower()
    return all(any(word in text for word in group) for group in groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=DEMO_TOKENS)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS to try")
    parser.add_argument("--book-questions", type=int, default=len(BOOK), help="how many of BOOK to ask")
    parser.add_argument("--planted", type=int, default=len(PLANTED), help="how many planted facts to ask about")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chosen = {name: SETTINGS[name] for name in args.settings.split(",")}
    book = BOOK[: args.book_questions]
    model, tokenizer = load_nugget2d()
    ids = tokenizer(bundled_text(), add_special_tokens=False, verbose=False).input_ids[: args.tokens]
    ids = plant(tokenizer, ids, PLANTED)
    asked = PLANTED[: args.planted]
    questions = book + [(f"What is the secret code of the {color} door?", [[code]]) for _, color, code in asked]
    configs = {"nugget2d": demo_cache_config(args.budget), "full KV": full_cache_config(len(ids), MAX_NEW)}
    rows, summary = [], {}
    for label, config in configs.items():
        session = StreamingSession(model, tokenizer, config)
        started = time.perf_counter()
        session.ingest_ids(ids)
        read_s = time.perf_counter() - started
        for name, settings in chosen.items():
            for question, groups in questions:
                started = time.perf_counter()
                answer = "".join(session.fork().ask(question, settings)).strip()
                row = {
                    "cache": label,
                    "settings": name,
                    "question": question,
                    "answer": answer,
                    "correct": correct(answer, groups),
                    "loops": loops(answer),
                    "seconds": round(time.perf_counter() - started, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            mine = [r for r in rows if r["cache"] == label and r["settings"] == name]
            summary[f"{label} / {name}"] = {
                "book_correct": sum(r["correct"] for r in mine[: len(book)]),
                "planted_correct": sum(r["correct"] for r in mine[len(book) :]),
                "loops": sum(r["loops"] for r in mine),
                "answers": len(mine),
                "read_seconds": round(read_s, 1),
            }
    record = {
        "command": (
            f"OMP_NUM_THREADS=1 python benchmarks/demo/answers.py --tokens {args.tokens} --budget {args.budget} "
            f"--settings {args.settings} --book-questions {args.book_questions} --planted {args.planted}"
        ),
        "machine": "this project's shared 2-core CPU",
        "load_average_1min_at_end": round(os.getloadavg()[0], 1),
        "tokens": len(ids),
        "summary": summary,
        "answers": rows,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
