"""Tiny random decoder models for tests: seconds to build, no files."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

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


#: The tiny models' sliding window (Gemma 3 and Mistral-style): shorter than the tests' texts.
WINDOW = 8


def tiny_gemma3(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    """A 4-layer Gemma 3 as the real ones are built: sliding-window layers (window :data:`WINDOW`, a local
    RoPE base) around global ones (another base, linear scaling), QK-norm, head dim 32 ≠ hidden / heads
    (16), ``query_pre_attn_scalar`` 24 (so the attention scaling is not ``head_dim ** -0.5``); layer 0
    slides, as in Gemma 3. In eval mode."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        **{
            **SHAPE,
            "head_dim": 32,
            "query_pre_attn_scalar": 24,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0},
            },
            **overrides,
        }
    )
    return Gemma3ForCausalLM(config).eval()


def tiny_qwen3(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    """A 4-layer Qwen3 (QK-norm; head dim 32 ≠ hidden / heads), in eval mode."""
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**{**SHAPE, "head_dim": 32, **overrides})).eval()


def tiny_mistral(seed: int = 0, **overrides) -> MistralForCausalLM:
    """A 4-layer Mistral whose every layer attends within a sliding window of :data:`WINDOW`, in eval mode."""
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**{**SHAPE, "sliding_window": WINDOW, **overrides})).eval()


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
