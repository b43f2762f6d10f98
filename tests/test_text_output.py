"""Streamed text: multi-byte characters split across tokens, stop strings, chat template pieces."""

from __future__ import annotations

from nugget2d.runtime.chat import ChatFormat
from nugget2d.runtime.generation import TextDeltas


class ByteTokenizer:
    """One token per UTF-8 byte, as byte-level BPE does for rare characters."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")

    def encode(self, text):
        return list(text.encode("utf-8"))


def _stream(text: str, stop=()) -> tuple[list[str], TextDeltas]:
    deltas = TextDeltas(ByteTokenizer(), stop)
    pieces = [deltas.push(token) for token in ByteTokenizer().encode(text)]
    pieces.append(deltas.flush())
    return pieces, deltas


def test_multibyte_characters_are_never_split():
    pieces, deltas = _stream("café – 東京 🐟!")
    assert "".join(pieces) == "café – 東京 🐟!" == deltas.text
    assert all("\ufffd" not in piece for piece in pieces)


def test_text_is_cut_at_the_first_stop_string_and_nothing_of_it_leaks():
    pieces, deltas = _stream("The answer is 42.\nQuestion: next", stop=("\nQuestion:",))
    assert "".join(pieces) == "The answer is 42." == deltas.text and deltas.stopped
    assert not any("\n" in piece for piece in pieces)


def test_a_partial_stop_string_that_does_not_complete_is_shown():
    pieces, _ = _stream("a\nQuest for fire", stop=("\nQuestion:",))
    assert "".join(pieces) == "a\nQuest for fire"


class TemplateTokenizer:
    chat_template = "set"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        text = "<sys>"
        for message in messages:
            text += f"<{message['role']}>{message['content']}</>"
        return text + ("<assistant>" if add_generation_prompt else "")


def test_chat_template_is_cut_around_the_document_and_questions():
    chat = ChatFormat.from_tokenizer(TemplateTokenizer())
    assert chat.document_prefix == "<sys><user>"
    assert chat.question("Why?", first=True) == "\n\nWhy?</><assistant>"
    assert chat.question("And?", first=False) == "</><user>And?</><assistant>"
    plain = ChatFormat.plain()
    assert plain.document_prefix == "" and plain.question("Q", first=True) == "\n\nQ\n"
