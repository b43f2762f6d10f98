"""Where a document and the questions about it go in a model's chat template.

The document is streamed into the cache first, so the template is cut into the text before the
document, the text that closes it and asks the first question, and the text that asks a later
question after an answer. Models without a chat template get plain separators.
"""

from __future__ import annotations

from dataclasses import dataclass

_DOCUMENT = "\u2063\u2063DOCUMENT\u2063\u2063"
_QUESTION = "\u2063\u2063QUESTION\u2063\u2063"
_ANSWER = "\u2063\u2063ANSWER\u2063\u2063"


@dataclass(frozen=True)
class ChatFormat:
    """Text pieces around a streamed document and its questions."""

    document_prefix: str
    first_question: str  # contains _QUESTION
    next_question: str  # contains _QUESTION

    @classmethod
    def plain(cls) -> ChatFormat:
        """No template: the question follows the text after a blank line."""
        return cls("", "\n\n" + _QUESTION + "\n", "\n\n" + _QUESTION + "\n")

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatFormat:
        """Cut the tokenizer's chat template around markers (plain if it has none)."""
        if not getattr(tokenizer, "chat_template", None):
            return cls.plain()

        def render(messages: list[dict[str, str]]) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

        one_turn = render([{"role": "user", "content": _DOCUMENT + "\n\n" + _QUESTION}])
        two_turns = render(
            [
                {"role": "user", "content": _DOCUMENT + "\n\n" + _QUESTION},
                {"role": "assistant", "content": _ANSWER},
                {"role": "user", "content": _QUESTION},
            ]
        )
        prefix, first = one_turn.split(_DOCUMENT, 1)
        return cls(prefix, first, two_turns.split(_ANSWER, 1)[1])

    def question(self, text: str, first: bool) -> str:
        """The text that asks ``text``: after the document (``first``) or after an answer."""
        return (self.first_question if first else self.next_question).replace(_QUESTION, text)
