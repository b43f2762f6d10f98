"""Held-out evaluation during training: loss and perplexity per objective, autoencoding BLEU
(sacrebleu) from greedy reconstructions decoded by the runtime's one generation loop, and the
scorer's rank correlation and top-10% recall against the frozen model's KV importance."""

from __future__ import annotations

import math

import torch

from .generation import GenerationSettings, TokenStream
from .objectives import NuggetObjective, ScorerObjective
from .train_data import Example, collate


@torch.no_grad()
def evaluate(
    objective: NuggetObjective | ScorerObjective,
    heldout: list[Example],
    pad_id: int,
    batch_size: int,
    tokenizer,
    bleu_examples: int,
) -> dict[str, float]:
    """``heldout_loss`` (the training loss) over all held-out examples and, per objective when there
    are several, ``heldout_loss/NAME``; for cache objectives ``heldout_ppl`` (of the cross-entropy),
    with ``heldout_ce`` and ``heldout_kl`` when the loss has a KL term, and ``autoencode_bleu`` (0–1)
    over the first ``bleu_examples`` autoencoding examples; for the scorer ``heldout_rank_corr`` and
    ``heldout_topk_recall`` (averaged over examples). Leaves the module in training mode."""
    if not heldout:
        return {}
    objective.eval()
    by_objective: dict[str, list[float]] = {}
    totals: dict[str, float] = {}
    for begin in range(0, len(heldout), batch_size):
        chunk = heldout[begin : begin + batch_size]
        groups: dict[str, list[Example]] = {}
        for example in chunk:
            groups.setdefault(example.objective, []).append(example)
        for name, examples in groups.items():
            values = objective.measure(**collate(examples, pad_id))
            by_objective.setdefault(name, []).append(values.pop("loss"))
            for key, value in values.items():
                totals[key] = totals.get(key, 0.0) + value * len(examples)
    losses = [loss for values in by_objective.values() for loss in values]
    record = {"heldout_loss": sum(losses) / len(losses)}
    if len(by_objective) > 1:
        record.update({f"heldout_loss/{name}": sum(v) / len(v) for name, v in by_objective.items()})
    record.update({f"heldout_{key}": total / len(heldout) for key, total in totals.items()})
    if isinstance(objective, NuggetObjective):
        record["heldout_ppl"] = math.exp(min(record.get("heldout_ce", record["heldout_loss"]), 50.0))
    autoencode = [e for e in heldout if e.objective == "autoencode"][:bleu_examples]
    if autoencode:
        record["autoencode_bleu"] = autoencode_bleu(objective, autoencode, pad_id, tokenizer)
    objective.train()
    return record


@torch.no_grad()
def autoencode_bleu(objective: NuggetObjective, examples: list[Example], pad_id: int, tokenizer) -> float:
    """Corpus BLEU (sacrebleu, 0–1) of greedy reconstructions of each example's text from its
    nuggets, as many tokens as the original."""
    import sacrebleu

    hypotheses, references = [], []
    for example in examples:
        batch = {k: v.to(objective.model.device) for k, v in collate([example], pad_id).items()}
        cache = objective.cache(**{k: v for k, v in batch.items() if not k.startswith(("input", "labels"))})
        stream = TokenStream(objective.model, cache, example.prompt, GenerationSettings(len(example.target)))
        hypotheses.append(tokenizer.decode(list(stream), skip_special_tokens=True))
        references.append(tokenizer.decode(list(example.target), skip_special_tokens=True))
    return sacrebleu.corpus_bleu(hypotheses, [references]).score / 100
