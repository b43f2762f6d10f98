"""OpenAI's log-probability objects, built from the :class:`~nugget2d.runtime.generation.TokenScore`
records the generation loop keeps.

Each token's text is its share of the decoded text (decoded a few tokens at a time, as streaming
detokenizers do), so the tokens' texts join into the response's text and ``text_offset`` points
into it; a token that ends inside a multi-byte character has an empty text and the next one carries
the character. Special tokens (the end token) have empty texts, as in the decoded text.
"""

from __future__ import annotations

from nugget2d.runtime.generation import TokenScore

_WINDOW = 6  # tokens decoded before the new one, so a tokenizer's spacing rules see their context


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Each token's share of ``tokenizer.decode(ids)``: the pieces join into the decoded text."""
    pieces: list[str] = []
    start = done = 0  # ids[start:done] decoded already; ids[done:i] are held back (part of a character)
    for i in range(len(ids)):
        before = tokenizer.decode(ids[start:done], skip_special_tokens=True)
        after = tokenizer.decode(ids[start : i + 1], skip_special_tokens=True)
        if after.endswith("\ufffd") or not after.startswith(before):
            pieces.append("")
            continue
        pieces.append(after[len(before) :])
        start, done = max(start, i + 1 - _WINDOW), i + 1
    return pieces


def completion_logprobs(
    tokenizer, ids: list[int], scores: list[TokenScore | None], text_end: int | None = None
) -> dict:
    """The ``logprobs`` object of a ``/v1/completions`` choice for the tokens ``ids`` (the echoed prompt,
    then the new tokens) with their ``scores`` (``None``: not scored). ``top_logprobs`` maps the
    texts of the most likely tokens, and of the chosen one, to their log-probabilities.
    ``text_end``: the choice's text was cut there (a stop string), so tokens starting after it are left out."""
    pieces = token_pieces(tokenizer, ids)
    offsets = _offsets(pieces)
    kept = _kept(offsets, text_end)
    top_logprobs: list[dict[str, float] | None] = []
    for piece, score in zip(pieces[:kept], scores[:kept]):
        if score is None:
            top_logprobs.append(None)
            continue
        best: dict[str, float] = {}
        for token, logprob in score.top:
            text = piece if token == score.token else tokenizer.decode([token], skip_special_tokens=True)
            best.setdefault(text, logprob)
        best[piece] = score.logprob  # the chosen token is always listed, under its text in ``tokens``
        top_logprobs.append(best)
    return {
        "tokens": pieces[:kept],
        "token_logprobs": [None if score is None else score.logprob for score in scores[:kept]],
        "top_logprobs": top_logprobs,
        "text_offset": offsets[:kept],
    }


def chat_logprobs(tokenizer, ids: list[int], scores: list[TokenScore], text_end: int | None = None) -> dict:
    """The ``logprobs`` object of a ``/v1/chat/completions`` choice for the new tokens ``ids``: one
    ``content`` entry per token, with its ``top_logprobs`` most likely alternatives."""
    pieces = token_pieces(tokenizer, ids)
    kept = _kept(_offsets(pieces), text_end)
    content = []
    for piece, score in zip(pieces[:kept], scores[:kept]):
        alternatives = []
        for token, logprob in score.top:
            text = piece if token == score.token else tokenizer.decode([token], skip_special_tokens=True)
            alternatives.append({"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))})
        content.append(
            {
                "token": piece,
                "logprob": score.logprob,
                "bytes": list(piece.encode("utf-8")),
                "top_logprobs": alternatives,
            }
        )
    return {"content": content, "refusal": None}


def _offsets(pieces: list[str]) -> list[int]:
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return offsets


def _kept(offsets: list[int], text_end: int | None) -> int:
    """How many tokens a text cut at ``text_end`` (``None``: not cut) still shows."""
    if text_end is None:
        return len(offsets)
    return sum(1 for offset in offsets if offset < text_end)
