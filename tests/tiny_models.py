"""Tiny random decoder models for tests: seconds to build, no files."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

VOCAB = 97


SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 4-layer Llama, hidden 64, 4 query / 2 KV heads (GQA), in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**SHAPE, **overrides})).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """A 4-layer Qwen2 (q/k/v biases) of the same shape, in eval mode."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval()


WORDS = (
    "the a an of and to in is was it that he she they we you i his her for on with as at by from this be "
    "had not but what all were when there can said which do their if will up one out so about who them "
    "fish river angler water day time man good old book door blue secret code . , ! ? ' \""
).split()


def tiny_tokenizer():
    """A word-level fast tokenizer over :data:`WORDS` (ids fit the tiny models' vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(directory, **overrides):
    """Write a tiny Llama and its tokenizer as a local HF model directory; return the path."""
    model = tiny_llama(**overrides)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def text_file(directory, words: int = 1500):
    """A text file of ``words`` random words from :data:`WORDS` (seeded) in ``directory``."""
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(WORDS), (words,), generator=generator).tolist()
    path = directory / "text.txt"
    path.write_text(" ".join(WORDS[i] for i in picks))
    return path


#: A few plain sentences: the training tests' corpus.
SENTENCES = (
    "the old angler said that the river was good for fish . "
    "she had a blue book and he had an old door . "
    "they will fish in the river when the day is good . "
)
