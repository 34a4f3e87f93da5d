"""LoRA adapters on the anchors of a stitched language model, through PEFT (ESTA's setting).

ESTA (CVPR 2024, the SN-Net authors) adapts a stitched family of large models to a task by
training low-rank adapters on the anchors and the stitching layers, the anchors' own weights
frozen. :func:`add_lora` injects PEFT's LoRA layers into every anchor's transformers model in
place (``peft.inject_adapter_in_model``; the target modules are PEFT's defaults for the model
type unless named), so the routes, the evaluation and the KV cache run them unchanged; PEFT
freezes everything else of the anchor. The stitching layers stay trainable.

Saving (:meth:`StitchedLM.save_pretrained`) writes the network with every adapter merged into its
weight (:func:`merged_state`: a plain stitched network that every command loads) and, beside it,
``adapters.safetensors``: only what training changed, the adapters and the stitching layers
(:func:`adapter_state`), a small file to keep with the anchors it was trained on.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["ADAPTERS_NAME", "adapter_state", "add_lora", "has_lora", "merged_copy", "merged_state"]

ADAPTERS_NAME = "adapters.safetensors"


def _lora_layers(net: nn.Module) -> dict[str, Any]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in net.named_modules() if isinstance(m, LoraLayer)}


def has_lora(net: nn.Module) -> bool:
    """Whether ``net`` holds PEFT LoRA layers."""
    return bool(_lora_layers(net))


def add_lora(net: Any, rank: int, alpha: float, targets: Sequence[str] | None = None) -> int:
    """Inject LoRA adapters of ``rank`` (scaled by ``alpha / rank``) into every anchor of ``net`` and freeze the
    anchors' own weights; returns the number of adapted modules. Needs ``peft`` (``pip install snnet[lm]``)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ConfigError("model.anchor_lora_rank needs PEFT: pip install 'snnet[lm]' (or pip install peft)") from e
    for part in net.anchors:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets) if targets else None,
                            fan_in_fan_out=part.kind == "gpt2")  # GPT-2's Conv1D stores its weight transposed
        try:
            inject_adapter_in_model(config, part.model)
        except ValueError as e:  # PEFT: no module matched, or no default targets for this kind
            raise ConfigError(f"LoRA on {part.kind} anchors: {str(e).splitlines()[0]} (model.anchor_lora_targets "
                              "names the modules)") from e
    return len(_lora_layers(net))


def merged_state(net: nn.Module, state: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``net``'s state dict (or ``state``) with every LoRA adapter merged into the weight it adapts, under the
    names the plain network uses: what a network without adapters loads."""
    out = dict(state if state is not None else net.state_dict())
    for name, m in _lora_layers(net).items():
        for key in [k for k in out if k.startswith(f"{name}.lora_")]:
            del out[key]
        for key in [k for k in out if k.startswith(f"{name}.base_layer.")]:
            out[f"{name}.{key[len(name) + len('.base_layer.'):]}"] = out.pop(key)
        with torch.no_grad():
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters)
            out[f"{name}.weight"] = out[f"{name}.weight"] + delta.to(out[f"{name}.weight"])
    return out


def merged_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with every LoRA adapter merged into the layer it adapts, that plain layer in the
    adapter's place: what transformers' ``save_pretrained`` writes and ``from_pretrained`` reads back (the module
    itself keeps its adapters). Without adapters, the copy only."""
    out = copy.deepcopy(module)
    for name, m in _lora_layers(out).items():
        m.merge()
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, m.get_base_layer())
    return out


def adapter_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only what LoRA training changes: the adapters' factors and the stitching layers."""
    return {k: v for k, v in state.items() if ".lora_" in k or k.startswith("stitch_layers.")}
