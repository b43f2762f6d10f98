"""The two LoRA adapters on the frozen LM (peft): ``encoder`` writes nuggets, ``decoder`` reads them."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel

from .config import Nugget2DConfig

ENCODER = "encoder"
DECODER = "decoder"
ADAPTERS = (ENCODER, DECODER)


def lora_config(config: Nugget2DConfig, num_layers: int, adapter: str) -> LoraConfig:
    """LoRA settings of one adapter; the encoder skips the first λ layers (the scorer reads them)."""
    first = config.scorer_layer if adapter == ENCODER else 0
    layers = list(range(min(first, num_layers), num_layers))
    if not layers:
        raise ValueError(
            f"scorer_layer={config.scorer_layer} leaves no layer for the encoder adapter "
            f"(the model has {num_layers}); choose scorer_layer < {num_layers}"
        )
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapters(base_model: PreTrainedModel, config: Nugget2DConfig) -> PeftModel:
    """Inject both adapters (LoRA B at zero: the model is unchanged) and freeze everything else; the
    decoder adapter trains only when the config says so (otherwise the frozen model reads)."""
    num_layers = base_model.config.num_hidden_layers
    peft_model = get_peft_model(base_model, lora_config(config, num_layers, ENCODER), adapter_name=ENCODER)
    peft_model.add_adapter(DECODER, lora_config(config, num_layers, DECODER))
    set_trainable(peft_model, config.decoder_adapter)
    return peft_model


def set_trainable(peft_model: PeftModel, decoder_adapter: bool) -> None:
    """Let the encoder LoRA train, and the decoder LoRA too when ``decoder_adapter``; freeze the rest."""
    trained = ADAPTERS if decoder_adapter else (ENCODER,)
    for name, parameter in peft_model.named_parameters():
        parameter.requires_grad_(any(f".{adapter}." in name for adapter in trained) and "lora_" in name)


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """Every layer peft injected LoRA into, in module order (found once: walking the model costs ~10 ms)."""
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def activate(layers: list[BaseTunerLayer], adapter: str | None) -> None:
    """Make ``adapter`` (or none) the active LoRA in every injected layer, leaving requires_grad alone.

    Hand-rolled because peft's ``set_adapter`` also freezes the inactive adapter, and we train both.
    """
    active = [adapter] if adapter else []
    for layer in layers:
        layer._active_adapter = active


def is_identity(layers: list[BaseTunerLayer], adapter: str) -> bool:
    """True when every LoRA ``B`` of ``adapter`` is zero, so running it changes no output (an adapter
    that was never trained, as a scorer-only one)."""
    return not any(bool(layer.lora_B[adapter].weight.any()) for layer in layers if adapter in layer.lora_B)
