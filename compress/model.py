"""``Nugget2DModel``: a frozen decoder LM plus scorer and two LoRA adapters (docs/design.md).

``compress`` runs the encoder adapter over a text, scores its tokens, and keeps the selected
tokens' keys and values at every layer as nuggets in a :class:`NuggetCache`; ``forward`` decodes
over such a cache. Any Hugging Face decoder with rotary positions and the attention interface
works (Llama, Mistral, Qwen2/3, SmolLM, Gemma 3, ...). Models that mix layer types (Gemma 3's
sliding-window and global layers, Mistral's sliding window) keep a sliding-window layer's window raw
and compress the global layers' entries, each layer re-rotated with its own RoPE.
Longer than ~400 lines because it is the method's one object: adapters, scorer, encode, select,
compress, decode and the forward pass they share; storage is in ``cache.py``, selection in ``policies/``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .adapters import ADAPTERS, DECODER, ENCODER, activate, attach_adapters, is_identity, tuner_layers
from .attention import implementation_name
from .cache import NuggetCache
from .config import Nugget2DConfig
from .hf_compat import CACHE_ARGUMENT
from .policies import PerHeadBudget
from .rope import Rotary, layer_rotaries
from .scorer import make_scorer
from .selection import nugget_count, select_threshold, select_topk

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCORER_WEIGHTS = "scorer.safetensors"


def model_fingerprint(model: PreTrainedModel) -> str:
    """A hash of the architecture and a sample of the token embeddings (bf16-rounded, so the
    same weights in fp32, bf16 or on another device give the same fingerprint)."""
    config = model.config
    shape = {
        key: getattr(config, key, None)
        for key in (
            "model_type",
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        )
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    embeddings = model.get_input_embeddings().weight
    sample = embeddings[:: max(1, embeddings.shape[0] // 64)].detach().to("cpu", torch.bfloat16)
    digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def check_architecture(model: PreTrainedModel) -> None:
    """Raise ``ValueError`` unless ``model`` is a decoder LM with rotary positions and the attention interface."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None or getattr(body, "rotary_emb", None) is None:
        raise ValueError(
            f"{model_type} has no rotary position embedding; Nugget2D needs a decoder-only model with rotary "
            "positions (Llama, Mistral, Qwen2/3, SmolLM, ...)"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(
            f"{model_type} does not dispatch attention through transformers' AttentionInterface, "
            "so the nugget score bias cannot be applied; use a model that does (Llama, Mistral, Qwen2/3, ...)"
        )


def layer_windows(model: PreTrainedModel) -> list[int | None]:
    """Each decoder layer's sliding window, None for a global layer: the attention module's own
    ``sliding_window`` (Gemma 3, Qwen2/3), else ``config.layer_types``, else the config's one window for
    every layer (Mistral)."""
    config = model.config
    layers = getattr(model.get_decoder(), "layers", None) or []
    types = getattr(config, "layer_types", None)
    windows = []
    for index in range(config.num_hidden_layers):
        attention = getattr(layers[index], "self_attn", None) if index < len(layers) else None
        if attention is not None and hasattr(attention, "sliding_window"):
            window = attention.sliding_window
        elif types is not None:
            window = config.sliding_window if types[index] == "sliding_attention" else None
        else:
            window = getattr(config, "sliding_window", None)
        windows.append(int(window) if window else None)
    return windows


def _model_name(model: PreTrainedModel) -> str:
    return getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "unnamed model"


class Nugget2DModel(nn.Module):
    """The frozen base LM with encoder/decoder LoRA adapters and the scorer; only those train."""

    def __init__(self, base_model: PreTrainedModel, config: Nugget2DConfig, attention: str = "sdpa") -> None:
        super().__init__()
        check_architecture(base_model)
        fingerprint = model_fingerprint(base_model)
        name = _model_name(base_model)
        if config.base_model_hash and config.base_model_hash != fingerprint:
            raise ValueError(
                f"this adapter belongs to base model '{config.base_model}' (fingerprint {config.base_model_hash[:12]}) "
                f"and cannot be loaded onto '{name}' (fingerprint {fingerprint[:12]}); "
                "load it onto the model it was trained for"
            )
        config.base_model = config.base_model or name
        config.base_model_hash = fingerprint
        self.config = config
        self.fingerprint = fingerprint
        self.adapter_source = "untrained"  # or the adapter directory it was restored from
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        self.peft_model = attach_adapters(base_model, config)
        self._lora_layers = tuner_layers(self.peft_model)
        weight = base_model.get_input_embeddings().weight
        heads = (self.num_layers, self.num_kv_heads) if config.allocation == "head" else None
        self.scorer = make_scorer(base_model.config.hidden_size, heads, config.scorer_members).to(
            device=weight.device, dtype=torch.float32
        )
        #: each layer's sliding window (None: global) and RoPE
        self.layer_windows = layer_windows(base_model)
        self._rotaries = layer_rotaries(
            base_model.get_decoder(), getattr(base_model.config, "layer_types", None), self.num_layers
        )
        self.set_attention(attention)

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_base(
        cls, base_model: PreTrainedModel, config: Nugget2DConfig | None = None, attention: str = "sdpa"
    ) -> Nugget2DModel:
        """Wrap ``base_model`` (modified in place: LoRA layers are injected, weights frozen)."""
        return cls(base_model, config or Nugget2DConfig(), attention)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, base_model: PreTrainedModel | None = None, attention: str = "sdpa"
    ) -> Nugget2DModel:
        """Restore an adapter directory (docs/design.md) onto ``base_model``.

        Without ``base_model`` the config's ``base_model`` must be a local model directory.
        Refuses a base model whose fingerprint differs from the one the adapter was saved with.
        """
        directory = Path(directory)
        config = Nugget2DConfig.load(directory)
        if base_model is None:
            if not Path(config.base_model).is_dir():
                raise ValueError(
                    f"adapter {directory} was trained on '{config.base_model}', which is not a local directory; "
                    "pass base_model= (nugget2d.runtime.load_model() loads the embedded default)"
                )
            base_model = AutoModelForCausalLM.from_pretrained(config.base_model)
        model = cls(base_model, config, attention)
        for path in (directory / ADAPTER_WEIGHTS, directory / SCORER_WEIGHTS):
            if not path.is_file():
                raise ValueError(f"adapter directory {directory} is incomplete: {path.name} is missing")
        weights = load_file(str(directory / ADAPTER_WEIGHTS))
        for adapter in ADAPTERS:
            prefix = f"{adapter}."
            part = {key[len(prefix) :]: value for key, value in weights.items() if key.startswith(prefix)}
            set_peft_model_state_dict(model.peft_model, part, adapter_name=adapter)
        model.scorer.load_state_dict(load_file(str(directory / SCORER_WEIGHTS)))
        model.adapter_source = str(directory)
        return model.to(base_model.get_input_embeddings().weight.device)

    @classmethod
    def training_free(cls, base_model: PreTrainedModel, ratio: float = 0.1, attention: str = "sdpa") -> Nugget2DModel:
        """``base_model`` wrapped without training: a per-head cache whose scorer is zero (it ranks nothing), so
        the attention of each segment's last queries alone chooses what stays (the observation window,
        :class:`~nugget2d.compress.policies.PerHeadBudget`), over the unmodified model's K/V (zero LoRA)."""
        model = cls(base_model, Nugget2DConfig(ratio=ratio, allocation="head"), attention)
        with torch.no_grad():
            for parameter in model.scorer.parameters():
                parameter.zero_()
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the adapter directory: config, both LoRA adapters, scorer (trainable parts only)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        weights = {}
        for adapter in ADAPTERS:
            state = get_peft_model_state_dict(self.peft_model, adapter_name=adapter, save_embedding_layers=False)
            weights.update({f"{adapter}.{key}": value.detach().contiguous().cpu() for key, value in state.items()})
        save_file(weights, str(directory / ADAPTER_WEIGHTS))
        scorer_state = {key: value.detach().contiguous().cpu() for key, value in self.scorer.state_dict().items()}
        save_file(scorer_state, str(directory / SCORER_WEIGHTS))
        return directory

    # --- accessors -----------------------------------------------------------------------------

    @property
    def base(self) -> PreTrainedModel:
        """The causal LM (its LoRA layers injected)."""
        return self.peft_model.get_base_model()

    @property
    def device(self) -> torch.device:
        return self.base.get_input_embeddings().weight.device

    @property
    def num_layers(self) -> int:
        return self.base.config.num_hidden_layers

    @property
    def compressed_layers(self) -> list[int]:
        """The global layers: those whose entries are compressed (all layers but sliding-window ones)."""
        return [index for index, window in enumerate(self.layer_windows) if window is None]

    @property
    def num_kv_heads(self) -> int:
        config = self.base.config
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def set_attention(self, backend: str) -> None:
        """Choose the attention backend (``eager``, ``sdpa``, ``flex``, ``flash_attn``)."""
        self.base.set_attn_implementation(implementation_name(backend))
        self.attention = backend

    def new_cache(self, positions: str | None = None, allocation: str | None = None) -> NuggetCache:
        """An empty cache bound to this model; ``positions`` and ``allocation`` default to the config's
        (a per-head cache needs a per-head scorer and cache positions)."""
        allocation = allocation or self.config.allocation
        positions = positions or self.config.positions
        if allocation == "head" and self.scorer.heads is None:
            raise ValueError(
                "per-head budgets need a scorer that scores every (layer, KV head); this adapter's scores tokens "
                "(train one with `nugget2d train --objective scorer`) — use allocation='token'"
            )
        return NuggetCache(self.num_layers, self.fingerprint, positions, allocation, self.layer_windows)

    @property
    def rotary_emb(self) -> Rotary:
        """What re-rotates moved keys: the base model's rotary embedding module, or one per layer when its
        layers use different ones (Gemma 3's local and global RoPE); caches take either."""
        first = self._rotaries[0]
        return first if all(rotary is first for rotary in self._rotaries) else tuple(self._rotaries)

    def layer_rotary(self, index: int) -> nn.Module:
        """Layer ``index``'s rotary embedding (called as ``(x, position_ids)``)."""
        return self._rotaries[index]

    def full_kv_bytes(self, tokens: int) -> int:
        """Bytes a plain KV cache of ``tokens`` tokens would take for this model (one row): ``tokens``
        entries per global layer, at most ``window - 1`` per sliding-window layer (what transformers'
        cache keeps)."""
        config = self.base.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        itemsize = self.base.get_input_embeddings().weight.element_size()
        entries = sum(tokens if window is None else min(tokens, window - 1) for window in self.layer_windows)
        return 2 * entries * self.num_kv_heads * head_dim * itemsize

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The LoRA and scorer parameters: all that trains."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    # --- the method ----------------------------------------------------------------------------

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: NuggetCache | None = None,
        allow_empty_rows: bool = False,
        frozen: bool = False,
        observer: Callable[..., None] | None = None,
        surprise: bool = False,
    ) -> NuggetCache:
        """Run the encoder adapter over ``input_ids`` ``(B, n)``, attending to ``cache``, and append
        the tokens to it as raw entries carrying their scores (no selection yet). With
        ``allow_empty_rows`` a row whose mask is all zeros appends only masked padding; ``frozen``
        appends the unmodified model's K/V instead (what a cache that keeps no nuggets holds);
        ``observer`` watches this pass's attention (:attr:`NuggetCache.observer`), and only this pass;
        ``surprise`` records each token's surprise (:meth:`surprise`) for policies that vote by it."""
        input_ids, mask = self._inputs(input_ids, attention_mask, allow_empty_rows)
        cache = self.new_cache() if cache is None else cache
        cache.observer = observer
        try:
            out = self.forward_pass(cache, input_ids, mask, None if frozen else ENCODER, self.base.get_decoder())
        finally:
            cache.observer = None
        if surprise:
            cache.set_surprise(self.surprise(out.last_hidden_state, input_ids, mask))
        return cache

    def surprise(self, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each token's surprise ``(B, n)``: its negative log-likelihood under the LM head over the
        ``hidden`` states before it (the first token, and padding, -inf: unknown)."""
        with torch.no_grad():
            logits = self.base.get_output_embeddings()(hidden[:, :-1]).float().log_softmax(dim=-1)
            nll = -logits.gather(-1, input_ids[:, 1:, None])[..., 0]
        unknown = torch.full_like(nll[:, :1], float("-inf"))
        return torch.cat([unknown, nll], dim=1).masked_fill(~mask, float("-inf"))

    def compress(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: NuggetCache | None = None,
        ratio: float | None = None,
    ) -> NuggetCache:
        """Encode ``input_ids`` ``(B, n)`` and keep the selected tokens' K/V as nuggets.

        The encoder adapter attends to ``cache`` when given and the nuggets are appended to it;
        otherwise a new cache is returned. A cache with ``positions="cache"`` is renumbered after (the
        nuggets' keys re-rotated to follow the entries before them). A per-head cache spreads the
        nuggets' entries over layers and KV heads by the scorer's per-head scores. ``attention_mask``
        marks real tokens (left or right padding). ``ratio`` overrides the config's for top-k selection.
        """
        input_ids, mask = self._inputs(input_ids, attention_mask)
        return self.keep_nuggets(self.encode(input_ids, mask, cache), mask, ratio=ratio)

    def keep_nuggets(
        self,
        cache: NuggetCache,
        mask: torch.Tensor,
        *,
        tail: int = 0,
        ratio: float | None = None,
        observed: list[torch.Tensor] | None = None,
        per_head: PerHeadBudget | None = None,
    ) -> NuggetCache:
        """Turn the ``mask.shape[1]`` entries encoded before the cache's last ``tail`` into nuggets
        (``mask`` marks the real ones), the ``tail`` staying raw: what a session does when its raw
        window was read over the whole text before the text before it is compressed. In a per-head
        cache ``per_head`` (default: :class:`~nugget2d.compress.policies.PerHeadBudget`'s defaults, as a
        session's) spreads them, ``observed`` (per layer ``(B, KV heads, entries)``, the attention the
        last queries paid) voting beside the scorer."""
        ratio = self.config.ratio if ratio is None else ratio
        if not cache.compressed_layers:  # every layer slides and keeps its window: nothing to compress
            return self._renumbered(cache)
        if cache.allocation == "head":
            return self._compress_per_head(cache, mask, ratio, tail, observed, per_head or PerHeadBudget())
        new, length = mask.shape[1], cache.get_seq_length()
        old = length - tail - new
        indices, valid = self.select(cache.main_layer.scores[:, old : old + new], mask, ratio)
        rows = indices.shape[0]
        kept = torch.arange(old, device=indices.device).expand(rows, old)
        raw = torch.arange(length - tail, length, device=indices.device).expand(rows, tail)
        index = torch.cat([kept, indices + old, raw], dim=1)
        cache.retain(
            index,
            torch.cat([torch.ones_like(kept, dtype=torch.bool), valid, torch.ones_like(raw, dtype=torch.bool)], 1),
        )
        converted = torch.zeros(cache.main_layer.is_nugget.shape, dtype=torch.bool, device=valid.device)
        converted[:, old : old + valid.shape[1]] = valid
        cache.convert(converted, self.config.bias_mode)
        return self._renumbered(cache)

    def _renumbered(self, cache: NuggetCache) -> NuggetCache:
        """With cache positions, entries renumbered 0, 1, 2, ... (keys re-rotated), as a session keeps them."""
        if cache.position_mode == "cache":
            cache.reposition(self.rotary_emb)
        return cache

    def _compress_per_head(
        self,
        cache: NuggetCache,
        mask: torch.Tensor,
        ratio: float,
        tail: int,
        observed: list[torch.Tensor] | None,
        per_head: PerHeadBudget,
    ) -> NuggetCache:
        """The ``n`` entries before the last ``tail`` compete across global layers and heads for
        ``ceil(n·r) · global layers · kv_heads`` entries (per row, ``n`` its real tokens)."""
        added = torch.tensor([nugget_count(int(n), ratio) for n in mask.sum(dim=1).tolist()], device=mask.device)
        before = cache.nugget_counts().to(mask.device)
        entries = added * len(self.compressed_layers) * self.num_kv_heads
        per_head.keep(
            cache,
            entries,
            self.rotary_emb,
            tail=tail,
            pool=mask.shape[1],
            bias_mode=self.config.bias_mode,
            observed=observed,
        )
        cache.nugget_span = before + added
        return self._renumbered(cache)

    def select(
        self, scores: torch.Tensor, mask: torch.Tensor | None = None, ratio: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of these tokens become nuggets: ``(indices, valid)`` by the config's selection rule."""
        if self.config.selection == "threshold":
            return select_threshold(scores, self.config.threshold, mask)
        return select_topk(scores, self.config.ratio if ratio is None else ratio, mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        nuggets: NuggetCache | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """Decode ``input_ids`` over ``nuggets`` (left untouched); HF-style logits and loss.

        The returned cache (``returned_cache(output)``) is a fork of ``nuggets`` with these tokens appended.
        """
        input_ids, mask = self._inputs(input_ids, attention_mask)
        cache = self.new_cache() if nuggets is None else nuggets.fork()
        return self.forward_pass(cache, input_ids, mask, self.reader_adapter, self.base, labels=labels)

    @property
    def reader_adapter(self) -> str | None:
        """The adapter that reads prompts and decodes over the cache: the decoder LoRA when one was
        trained, else none (the unmodified model)."""
        return DECODER if self.config.decoder_adapter else None

    def read(self, input_ids: torch.Tensor, cache: NuggetCache) -> NuggetCache:
        """Append ``input_ids`` ``(B, n)`` to ``cache`` as raw entries read the way a prompt is read
        (:attr:`reader_adapter`), without logits: for text read for one answer and never compressed."""
        input_ids, mask = self._inputs(input_ids, None)
        self.forward_pass(cache, input_ids, mask, self.reader_adapter, self.base.get_decoder())
        return cache

    def use_adapter(self, adapter: str | None) -> None:
        """Make ``adapter`` (or the frozen model, ``None``) run in the next passes. Without gradients an
        adapter whose LoRA is all zeros is not run at all: the output is the same, ~7 % sooner on CPU."""
        if adapter and not torch.is_grad_enabled() and is_identity(self._lora_layers, adapter):
            adapter = None
        activate(self._lora_layers, adapter)

    def forward_pass(
        self,
        cache: NuggetCache,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        adapter: str | None,
        module: nn.Module,
        score: bool = True,
        **extra,
    ):
        """The one forward-pass protocol over a nugget cache: ``module`` (the LM or its decoder body) with
        ``adapter`` (None: the frozen model) reads ``input_ids`` ``(B, n)`` (``mask`` marks real tokens)
        over ``cache`` and appends them with their positions and padding, and with ``score`` their
        scorer scores. Every pass — encoding, decoding, training's teacher, importance — runs here."""
        cache.check_model(self.fingerprint)
        self.use_adapter(adapter)
        positions = self.next_positions(cache, mask)
        cache.begin_step(positions, mask)
        if score:
            extra["output_hidden_states"] = True
        out = module(
            input_ids=input_ids, position_ids=positions, **{CACHE_ARGUMENT: cache}, use_cache=True, nugget_cache=cache,
            **extra,
        )  # fmt: skip
        if score:
            cache.set_scores(self.scorer(out.hidden_states[self.config.scorer_layer]))
        cache.end_step()
        return out

    def _inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, allow_empty_rows: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be a non-empty (batch, tokens) tensor, got shape {tuple(input_ids.shape)}"
            )
        if attention_mask is None:
            mask = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            mask = torch.as_tensor(attention_mask, device=self.device).reshape(input_ids.shape).bool()
        if not allow_empty_rows and not bool(mask.any(dim=1).all()):
            raise ValueError("empty text: a row of the batch has no tokens (its attention_mask is all zeros)")
        return input_ids, mask

    def next_positions(self, cache: NuggetCache, mask: torch.Tensor) -> torch.Tensor:
        """Position ids ``(B, Q)`` of the next tokens appended to ``cache`` (``mask`` marks the real
        ones): after the text seen (``original``) or after the cache entries (``cache``); padding
        slots repeat their neighbour's position."""
        if cache.batch_size == 0:
            offset = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        elif cache.batch_size != mask.shape[0]:
            raise ValueError(f"cache holds {cache.batch_size} rows but the input has {mask.shape[0]}")
        elif cache.position_mode == "cache":
            offset = cache.entry_counts().to(mask.device)
        else:
            offset = cache.seen_tokens.to(mask.device)
        steps = mask.long().cumsum(dim=1) - 1
        return offset[:, None] + steps.clamp(min=0)
