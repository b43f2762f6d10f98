"""``nugget2d score``: quality of batch-job outputs against gold JSONL.

QA is scored as the paper scores SQuAD: answers and predictions are normalised (lower case, no
punctuation, no articles, single spaces); a prediction is *correct* when it contains a gold
answer as a run of whole words (containment accuracy), and token F1 and exact match are the SQuAD
definitions, best over the gold answers. Summaries are scored with ROUGE-1/2/L F-measures
(``rouge-score``, Porter stemming), best over the references. Every gold example counts: one with
no prediction, or an error row, scores 0.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from .batch_io import id_key

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def contains_answer(prediction: str, gold: str) -> bool:
    """Whether the normalised ``gold`` occurs in the normalised ``prediction`` as whole words."""
    needle = normalize_answer(gold)
    if not needle:
        return False
    return f" {needle} " in f" {normalize_answer(prediction)} "


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD token F1 between normalised texts (1.0 when both are empty)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def score_qa(predictions: list[dict], gold: list[dict]) -> dict:
    """Containment accuracy, token F1 and exact match, averaged over the gold examples
    (``{id, question, answers: [...]}`` or ``answer``), matched to predictions by id and question."""
    answers = {}
    for row in predictions:
        if "question" in row:
            answers[(id_key(row["id"]), row["question"])] = row.get("answer")
    totals = Counter()
    for example in gold:
        golds = _gold_answers(example)
        prediction = answers.get((id_key(example["id"]), example["question"]))
        if prediction is None:
            totals["missing"] += 1
            continue
        totals["containment"] += any(contains_answer(prediction, g) for g in golds)
        totals["exact_match"] += any(normalize_answer(prediction) == normalize_answer(g) for g in golds)
        totals["f1"] += max(token_f1(prediction, g) for g in golds)
    count = len(gold)
    return {
        "task": "qa",
        "examples": count,
        "missing": totals["missing"],
        "containment": totals["containment"] / count,
        "f1": totals["f1"] / count,
        "exact_match": totals["exact_match"] / count,
    }


def score_summaries(predictions: list[dict], gold: list[dict]) -> dict:
    """Mean ROUGE-1/2/L F-measures over the gold documents (``{id, summary}`` or ``references``)."""
    from rouge_score import rouge_scorer

    metrics = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(metrics), use_stemmer=True)
    summaries = {id_key(row["id"]): row["summary"] for row in predictions if "summary" in row}
    totals = Counter()
    for example in gold:
        references = _gold_summaries(example)
        summary = summaries.get(id_key(example["id"]))
        if summary is None:
            totals["missing"] += 1
            continue
        for metric in metrics:
            totals[metric] += max(scorer.score(ref, summary)[metric].fmeasure for ref in references)
    count = len(gold)
    return {"task": "summarize", "examples": count, "missing": totals["missing"]} | {
        metric: totals[metric] / count for metric in metrics
    }


def score_files(task: str, pred_path: str | Path, gold_path: str | Path) -> dict:
    """Read both JSONL files and score them; ``ValueError`` naming the file and line of bad input."""
    predictions = list(read_jsonl(pred_path, "predictions"))
    gold = list(read_jsonl(gold_path, "gold"))
    if not gold:
        raise ValueError(f"gold file {gold_path} has no examples")
    for number, example in enumerate(gold, start=1):
        if "id" not in example or (task == "qa" and "question" not in example):
            needed = '"id" and "question"' if task == "qa" else '"id"'
            raise ValueError(f"gold file {gold_path} example {number} lacks {needed}")
        try:
            _gold_answers(example) if task == "qa" else _gold_summaries(example)
        except ValueError as err:
            raise ValueError(f"gold file {gold_path} example {number}: {err}") from None
    if task == "qa":
        return score_qa(predictions, gold)
    if task == "summarize":
        return score_summaries(predictions, gold)
    raise ValueError(f"task must be 'qa' or 'summarize', got {task!r}")


def read_jsonl(path: str | Path, what: str) -> Iterator[dict]:
    """The JSON objects of a JSONL file (blank lines skipped); ``ValueError`` at the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} file {path} does not exist")
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{what} file {path} line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{what} file {path} line {number} is not a JSON object")
            yield row


def _gold_answers(example: dict) -> list[str]:
    return _gold_strings(example, "answers", "answer")


def _gold_summaries(example: dict) -> list[str]:
    return _gold_strings(example, "references", "summary")


def _gold_strings(example: dict, many: str, one: str) -> list[str]:
    """``example[many]`` (a non-empty list of strings) or ``[example[one]]``; ``ValueError`` otherwise."""
    values = example.get(many, example.get(one))
    values = [values] if isinstance(values, str) else values
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        raise ValueError(f'give "{many}" (a non-empty list of strings) or "{one}" (a string)')
    return values
