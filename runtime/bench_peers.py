"""``kvpress:<Press>`` methods of ``nugget2d bench quality``: NVIDIA's kvpress presses as outside
references, measured in the same run, on the same windows and at the same fraction kept (issue 11).

A press runs on a plain Hugging Face copy of the base model (``sdpa`` attention; nugget2d's own
backends are not kvpress's): the context is prefilled with the press active into a
``DynamicCache`` (nugget2d's ratio ``r`` is kvpress's ``compression_ratio = 1 - r``, the fraction
removed), then the continuation or the repeated passage is scored teacher-forced over that cache
with the press inactive, at the same ids and original positions as
:func:`~nugget2d.runtime.bench_quality.perplexities`; for ``ruler`` and ``qa`` the question is read and
answered greedily over what the press kept (the question unseen while compressing).
Needs the ``peers`` extra (kvpress), checked before any model is loaded.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext

import torch
import transformers
from packaging.version import Version

from nugget2d.compress import BACKENDS
from nugget2d.compress.attention import implementation_name
from nugget2d.compress.hf_compat import CACHE_RENAMED_IN

from .bench_recall import recall_passage
from .chat import ChatFormat
from .models import load_model, resolve_model_dir
from .session import eos_ids, start_ids, token_log_probs

PREFIX = "kvpress:"
PRESSES = {
    "ExpectedAttention": "ExpectedAttentionPress",
    "KVzip": "KVzipPress",
    "SnapKV": "SnapKVPress",
    "StreamingLLM": "StreamingLLMPress",
}
INSTALL = (
    "pip install 'nugget2d[peers]' (kvpress 0.5.5 pins transformers<5.3: the extra installs transformers 5.2.0, "
    "which nugget2d is tested on; to keep the installed transformers instead: "
    "pip install --no-deps kvpress==0.5.5 'cachetools>=5.5.2,<6' 'fire>=0.6,<0.7' termcolor)"
)
SKIPPED = "not measured for kvpress presses: they compress a prefilled context, scored by ppl, recall_ppl, ruler, qa"
NOTES = {
    "compression_ratio": "kvpress compression_ratio = 1 - ratio (fraction removed), applied to the prefilled context",
    "cache_bytes": "bytes of the K/V tensors stored in the DynamicCache after the compressed prefill, all layers",
    "cache_bytes_unmasked": "the same without the entries a head-wise press (KVzip) leaves in the cache masked "
    "(kvpress masks them with a fake key; here they get an exact zero weight by a per-head attention mask)",
    "cache_tokens": "entries per layer stored; cache_tokens_unmasked: mean per layer and KV head not masked",
    "compress_vs_prefill": "time of the prefill with the press (KVzip: with its repeat passes) over a plain prefill "
    "of the same context (mean of one just before and one just after), same model and process; totals over windows",
    "kvzip": "KVzip's chat-template prefix length is set to the ids that open the stream (ruler: the tokenizer's "
    "start; qa: the chat template's text before the document)",
    "answer_seconds": "from the question to the last answer token over the compressed cache (compression not "
    "counted); peak_question_bytes: the cache's unmasked bytes after the answer",
}


def is_peer(method: str) -> bool:
    """Whether ``method`` names a kvpress press."""
    return method.startswith(PREFIX)


def press_class_name(method: str) -> str:
    """The kvpress class of ``kvpress:<Name>``; ``ValueError`` listing the known names otherwise."""
    name = method[len(PREFIX) :]
    if name not in PRESSES:
        raise ValueError(f"unknown kvpress press {name!r} in {method!r}; choose from {[PREFIX + n for n in PRESSES]}")
    return PRESSES[name]


def check_peers(methods: list[str]) -> None:
    """Validate the ``kvpress:`` methods among ``methods``: known names, and kvpress importable."""
    peers = [method for method in methods if is_peer(method)]
    for method in peers:
        press_class_name(method)
    if peers:
        _kvpress(peers[0])


def check_transformers(method: str, installed: str) -> None:
    """``ValueError`` if transformers ``installed`` is one kvpress 0.5.5 cannot run on: from 5.24 a model
    passes its cache as ``cache`` (5.24's pre-releases too), and kvpress's hooks look for ``past_key_values``."""
    if Version(installed).release[:2] >= CACHE_RENAMED_IN:
        raise ValueError(
            f"{method}: kvpress 0.5.5 reads the KV cache as `past_key_values`, which transformers {installed} "
            "renamed; run the kvpress methods beside transformers 5.23: pip install 'transformers<5.24'"
        )


def _kvpress(method: str = "kvpress:"):
    try:
        import kvpress
    except ImportError as err:  # absent, or installed without a dependency it imports
        raise ValueError(f"{method} needs kvpress ({err}); install the peers extra: {INSTALL}") from None
    check_transformers(method, transformers.__version__)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # Importing kvpress wraps every registered attention function (for its head-wise masks) in a local
    # override that passes ``dropout`` positionally where nugget2d's backends take ``scaling``: drop
    # the overrides of nugget2d's backends (transformers' own, which the presses use, stay wrapped).
    for backend in BACKENDS:
        try:
            del ALL_ATTENTION_FUNCTIONS[implementation_name(backend)]
        except KeyError:
            pass
    return kvpress


class PressRunner:
    """The base model as a plain HF model (loaded once) and the presses run on it."""

    def __init__(self, model_name: str | None, dtype: torch.dtype | None = None, device=None) -> None:
        self.kvpress = _kvpress()
        logging.getLogger("kvpress.presses.kvzip_press").setLevel(logging.ERROR)  # its cost warning, once per window
        self.model, self.tokenizer = load_model(model_name, dtype=dtype, device=device)
        self.model.set_attn_implementation("sdpa")  # KVzip refuses eager
        self.model.config.name_or_path = str(resolve_model_dir(model_name))  # KVzip loads its tokenizer from here

    @classmethod
    def for_model(cls, model) -> PressRunner:
        """A runner on the base model of a :class:`~nugget2d.compress.Nugget2DModel`, same dtype and device."""
        dtype = model.base.get_input_embeddings().weight.dtype
        return cls(model.config.base_model, dtype=dtype, device=model.device)

    def press(self, method: str, ratio: float):
        """The press of ``method`` keeping ``ratio`` of the context."""
        return getattr(self.kvpress, press_class_name(method))(compression_ratio=1 - ratio)

    def perplexities(self, method: str, ratio: float, window: list[int], context: int, options) -> dict:
        """Like :func:`~nugget2d.runtime.bench_quality.perplexities` for a press: NLL sums and counts of
        the continuation (``ppl``) and of the repeated passage (``recall_ppl``), plus the cache kept and
        the prefill times with and without the press."""
        start = start_ids(self.tokenizer, ChatFormat.plain())  # what opens the bench's (chat=False) sessions
        prefill = start + window[: context - 1]
        _, before = self._prefill(prefill, None)
        cache, press_s = self._prefill(prefill, self.press(method, ratio), prefix=len(start))
        masked = self._take_masks()  # before the next prefill: kvpress clears them at every prefill
        _, after = self._prefill(prefill, None)  # plain prefills on both sides: load drifts on a shared machine
        plain_s = (before + after) / 2
        result = {"prefill_s": plain_s, "compress_s": press_s, **self._sizes(cache, masked)}
        stored = cache.layers[0].keys.shape[-2]
        with self._masking(cache, masked):
            if "ppl" in options.metrics:
                nll = -self._score(cache, window[context - 1 : context + options.continuation], len(prefill))
                result["ppl"] = (float(nll.sum()), int(nll.numel()))
                for layer in cache.layers:  # back to the compressed context (the bench forks its session here)
                    layer.keys, layer.values = layer.keys[:, :, :stored], layer.values[:, :, :stored]
            if "recall_ppl" in options.metrics:
                repeat = recall_passage(window, options.repeat)
                nll = -self._score(cache, [window[context - 1], *repeat], len(prefill))
                result["recall_ppl"] = (float(nll.sum()), int(nll.numel()))
        return result

    def answer(
        self,
        method: str,
        ratio: float,
        split: tuple[list[int], list[int]],
        new_tokens: int,
        prefix: int | None = None,
    ) -> tuple[str, dict]:
        """A press's greedy answer after a prompt split into ``(context, tail)``: the context prefilled
        with the press active (the tail unseen), then the tail and the answer read over what it kept;
        with the cache kept, the prefill times and the answer's seconds and peak bytes. ``prefix``: ids
        opening the context that KVzip leaves out of its reconstruction (default: the tokenizer's own
        start, which a plain prompt carries). The answer ends at the model's EOS."""
        prefill, ids = split
        if prefix is None:
            prefix = len(start_ids(self.tokenizer, ChatFormat.plain()))
        stop = set(eos_ids(self.tokenizer, self.model))
        _, plain_s = self._prefill(prefill, None)
        cache, press_s = self._prefill(prefill, self.press(method, ratio), prefix=prefix)
        masked = self._take_masks()
        result = {"prefill_s": plain_s, "compress_s": press_s, **self._sizes(cache, masked)}
        position, out = len(prefill), []
        started = time.perf_counter()
        with self._masking(cache, masked):
            for _ in range(new_tokens):  # greedy, as the sessions decode
                token = int(self._forward(cache, ids, position).logits[0, -1].argmax())
                if token in stop:
                    break
                position, ids = position + len(ids), [token]
                out.append(token)
        result["answer_s"] = time.perf_counter() - started
        result["peak_bytes"] = self._sizes(cache, masked)["cache_bytes_unmasked"]
        return self.tokenizer.decode(out, skip_special_tokens=True), result

    def _attention(self) -> list:
        return [layer.self_attn for layer in self.model.model.layers]

    def _prefill(self, ids: list[int], press, prefix: int = 0) -> tuple:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        tensor = torch.tensor([ids], device=self.model.device)
        started = time.perf_counter()
        with torch.no_grad(), press(self.model) if press is not None else nullcontext():
            if hasattr(press, "prefix_length"):  # KVzip skips a chat-template prefix; here only start ids precede
                press.prefix_length = prefix
            # kvpress 0.5.5's hooks read cache_position, which transformers >= 5.3 no longer passes on itself
            positions = torch.arange(len(ids), device=self.model.device)
            self.model(input_ids=tensor, past_key_values=cache, cache_position=positions, logits_to_keep=1)
        return cache, time.perf_counter() - started

    def _take_masks(self) -> dict:
        """The entries a head-wise press masks in place, ``{layer: (batch, head, entry) indices}``, taken
        off the modules: kvpress would hide them behind one fake key per head that every query of a
        forward must miss, which often does not exist for a teacher-forced block (it raises then)."""
        masked = {}
        for index, module in enumerate(self._attention()):
            if getattr(module, "masked_key_indices", None) is not None:
                masked[index] = module.masked_key_indices
            module.masked_key_indices = None
        return masked

    @contextmanager
    def _masking(self, cache, masked: dict):
        """While scoring, give each attention layer with masked entries a causal mask per head that
        leaves them out (an exact zero weight, as kvpress intends)."""
        config = self.model.config
        groups = config.num_attention_heads // config.num_key_value_heads

        def hook(module, args, kwargs):
            batch, head, entry = masked[module.layer_idx]
            length = kwargs["hidden_states"].shape[1]
            total = cache.layers[module.layer_idx].keys.shape[-2] + length
            device = kwargs["hidden_states"].device
            causal = torch.arange(total - length, total, device=device)[:, None] >= torch.arange(total, device=device)
            mask = causal.expand(1, config.num_key_value_heads, length, total).clone()
            mask[batch, head, :, entry] = False
            return args, {**kwargs, "attention_mask": mask.repeat_interleave(groups, dim=1)}

        modules = self._attention()
        hooks = [modules[i].register_forward_pre_hook(hook, with_kwargs=True) for i in masked]
        try:
            yield
        finally:
            for handle in hooks:
                handle.remove()

    def _sizes(self, cache, masked: dict) -> dict:
        lengths = {layer.keys.shape[-2] for layer in cache.layers}
        if len(lengths) != 1:
            raise ValueError(f"press left layers of different lengths {sorted(lengths)}; the bench scores one mask")
        entries, layer = lengths.pop(), cache.layers[0]
        per_entry = layer.keys[0, 0, 0].nbytes + layer.values[0, 0, 0].nbytes  # one entry of one KV head
        stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        hidden = sum(len(indices[0]) for indices in masked.values())
        heads = len(cache.layers) * layer.keys.shape[1]
        return {
            "cache_tokens": entries,
            "cache_tokens_unmasked": entries - hidden / heads,
            "cache_bytes": stored,
            "cache_bytes_unmasked": stored - hidden * per_entry,
        }

    def _score(self, cache, ids: list[int], position: int) -> torch.Tensor:
        """Log-probabilities of ``ids[1:]`` given the cache and the ids before each (teacher forcing),
        ids at original positions from ``position``; the ids stay in the cache."""
        return token_log_probs(self._forward(cache, ids, position).logits[0, :-1], ids[1:])

    def _forward(self, cache, ids: list[int], position: int):
        """The model over ``ids`` at original positions from ``position``, appending them to ``cache``."""
        device = self.model.device
        with torch.no_grad():
            return self.model(
                input_ids=torch.tensor([ids], device=device),
                past_key_values=cache,
                position_ids=torch.arange(position, position + len(ids), device=device)[None],
            )


def note(record: dict, acc: dict, result: dict) -> None:
    """Add one window's sizes and times to a press's record and sums."""
    for key in ("cache_tokens", "cache_tokens_unmasked", "cache_bytes", "cache_bytes_unmasked"):
        record.setdefault(key, result[key])
    times = acc.setdefault("times", [0.0, 0.0, 0])
    times[0] += result["prefill_s"]
    times[1] += result["compress_s"]
    times[2] += 1


def finish(record: dict, acc: dict, metrics: list[str]) -> None:
    """Mean prefill times, their ratio, and the metrics a press is not measured on (with the reason)."""
    if "times" in acc:
        plain, press, count = acc["times"]
        record.update(prefill_s=plain / count, compress_s=press / count, compress_vs_prefill=press / plain)
        record["compression_ratio"] = 1 - record["ratio"]
    skipped = {metric: SKIPPED for metric in ("bleu",) if metric in metrics}
    if skipped:
        record["skipped"] = skipped


def describe(runner: PressRunner) -> dict:
    """What the results JSON says about the presses."""
    from importlib.metadata import version

    return {"version": version("kvpress"), "model": runner.model.config.name_or_path, "attention": "sdpa", **NOTES}
