"""From a request's messages or prompt to the text the model reads next.

Without a document the whole conversation goes through the tokenizer's chat template (plain
blank-line separated text when it has none). After a document the conversation must continue
the text the document was opened with: the template is rendered with a marker at the start of
the first user message, and what follows the marker is the prompt (the same cut
:class:`~nugget2d.runtime.chat.ChatFormat` makes for the CLI).
"""

from __future__ import annotations

from .errors import APIError

_MARK = "\u2063\u2063NUGGET2D-DOCUMENT\u2063\u2063"


def chat_text(tokenizer, messages: list[dict[str, str]], document_prefix: str | None = None) -> str:
    """The text that asks for the assistant's next message; ``document_prefix`` (the text a
    document session started with) means the conversation follows that document.

    ``APIError`` 400 when the template rejects the messages or cannot follow a document.
    """
    if not getattr(tokenizer, "chat_template", None):
        text = "\n\n".join(message["content"] for message in messages)
        return ("\n\n" + text + "\n") if document_prefix is not None else text + "\n"
    if document_prefix is None:
        return _render(tokenizer, messages)
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is None:
        raise _bad_messages("a chat about a document needs at least one user message")
    leading = messages[:first_user]
    attempts = [messages]
    if leading:  # system messages ahead of the document: fold them into the first user turn
        folded = "\n\n".join([m["content"] for m in leading] + [messages[first_user]["content"]])
        attempts.append([{**messages[first_user], "content": folded}, *messages[first_user + 1 :]])
    for attempt in attempts:
        at = next(i for i, m in enumerate(attempt) if m["role"] == "user")
        marked = [
            *attempt[:at],
            {**attempt[at], "content": _MARK + "\n\n" + attempt[at]["content"]},
            *attempt[at + 1 :],
        ]
        rendered = _render(tokenizer, marked)
        prefix, found, rest = rendered.partition(_MARK)
        if found and prefix == document_prefix:
            return rest
    raise _bad_messages(
        "these messages cannot follow a document in this model's chat template (the text before the first user "
        "message differs from the document's); drop the messages before the first user message"
    )


def _render(tokenizer, messages: list[dict[str, str]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # jinja raises its own errors for conversations a template refuses
        raise _bad_messages(f"the model's chat template rejected these messages: {err}") from err


def _bad_messages(message: str) -> APIError:
    return APIError(400, message, param="messages")


def prompt_ids(tokenizer, text: str, starts_stream: bool, templated: bool) -> list[int]:
    """Token ids of ``text``; a prompt that starts a stream gets the tokenizer's BOS unless a chat
    template already put its own opening text in."""
    add = starts_stream and not templated
    return list(tokenizer(text, add_special_tokens=add, verbose=False).input_ids)
