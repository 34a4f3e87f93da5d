"""FLOPs and parameter counts, per part, in the paper's convention.

SN-Net reports fvcore's numbers: one multiply-accumulate counts as one FLOP, attention
matmuls included, normalisation layers count ~5 FLOPs per element (fvcore's rough estimate),
and a 2-D adaptive average pool one FLOP per input element. torch's FlopCounterMode counts a
multiply-accumulate as two FLOPs, does not count normalisation, and does not see inside the
fused attention kernel of the CPU; so we halve its count, add fvcore's rules for norms and
for that kernel (timm's fused attention is also switched off while counting), and count 2-D
adaptive average pools where fvcore sees them.

That last point is why a ResNet's head used to come out short: fvcore traces the model and
counts the call ``aten::adaptive_avg_pool2d`` (512 x 7 x 7 = 25,088 FLOPs for ResNet-18),
while torch rewrites a pool to 1x1 as a ``mean`` before FlopCounterMode sees any op. So the
pool is counted at the call (a torch-function mode), before that rewrite. Plain ``mean``
calls stay uncounted, as in fvcore: Swin's and LeViT's token average, squeeze-excitation.
With that, snnet's count equals fvcore 0.1.5's on timm's models of every supported family
(``scripts/fvcore_check.py``): DeiT-Ti/S/B 1.258 / 4.608 / 17.583 G, Swin-T 4,509,194,496,
ResNet-18 1,819,065,856, LeViT-192 661,663,808 — the numbers the reference code reports.

A stitch's cost is the sum of the costs of the parts on its route, so the whole space is
priced from one pass over each anchor's parts, never by running every stitch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode


@contextlib.contextmanager
def unfused_attention(module: nn.Module) -> Iterator[None]:
    """Temporarily make timm attention modules use explicit matmuls, which can be counted."""
    saved = [(m, m.fused_attn) for m in module.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield
    finally:
        for m, v in saved:
            m.fused_attn = v


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# fvcore's rules, doubled because the total is halved (FlopCounterMode counts 2 per MAC)
def _layer_norm_flops(x_shape, normalized_shape, weight=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape) * (5 if weight is not None else 4)


def _group_norm_flops(x_shape, weight=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape) * (5 if weight is not None else 4)


def _bn_eval_flops(x_shape, weight=None, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(x_shape) * (2 if weight is not None else 1)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # torch prices the GPU attention kernels (QK^T and AV, as fvcore prices the explicit matmuls) but
    # not the CPU one, which its scaled_dot_product_attention takes from about a hundred tokens on: a
    # module calling it directly was priced without its attention (DeiT-Ti 1.08 G instead of 1.26)
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _fvcore_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {
        aten.native_layer_norm: _layer_norm_flops,
        aten.native_group_norm: _group_norm_flops,
        aten._native_batch_norm_legit_no_training: _bn_eval_flops,
    }
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_attention_flops
    return mapping


class _CountPools(TorchFunctionMode):
    """Counts 2-D adaptive average pools at the call, as fvcore does (one FLOP per input
    element), before torch turns a pool to 1x1 into a ``mean`` that no counter can tell
    from any other mean."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
            self.flops += args[0].numel()
        return func(*args, **(kwargs or {}))


def count_macs(fn, *args) -> tuple[int, object]:
    """Multiply-accumulates of one call (and its result), in fvcore's convention."""
    with FlopCounterMode(display=False, custom_mapping=_fvcore_mapping()) as counter, _CountPools() as pools:
        out = fn(*args)
    return counter.get_total_flops() // 2 + pools.flops, out


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class PartCosts:
    """MACs (at one input size, batch 1) and parameters of an anchor's parts."""

    stem_flops: int
    block_flops: tuple[int, ...]
    head_flops: int
    stem_params: int
    block_params: tuple[int, ...]
    head_params: int

    def route(self, start: int, stop: int, stem: bool, head: bool) -> tuple[int, int]:
        """(flops, params) of blocks start..stop-1, plus the stem and/or head."""
        flops = sum(self.block_flops[start:stop]) + (self.stem_flops if stem else 0) + (self.head_flops if head else 0)
        params = sum(self.block_params[start:stop]) + (self.stem_params if stem else 0) + (self.head_params if head else 0)
        return flops, params

    @property
    def total(self) -> tuple[int, int]:
        return self.route(0, len(self.block_flops), True, True)


@contextlib.contextmanager
def _counting(module: nn.Module, input_size: tuple[int, ...]) -> Iterator[torch.Tensor]:
    """Eval mode, unfused attention and one zero image (batch 1) on the module's device and dtype.

    Eval mode because training-mode batch norm and dropout are not what inference costs; the
    device may be ``meta``, where shapes propagate and nothing is computed. Parameters stop
    requiring grad meanwhile: a view of a parameter taken under no_grad (CaiT's expanded class
    token) would otherwise require grad without a grad_fn, which the counter's module tracker
    rejects.
    """
    was_training = module.training
    module.eval()
    grads = [(q, q.requires_grad) for q in module.parameters()]
    p = grads[0][0]
    try:
        for q, _ in grads:
            q.requires_grad_(False)
        with unfused_attention(module):
            yield torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    finally:
        module.train(was_training)
        for q, g in grads:
            q.requires_grad_(g)


@torch.no_grad()
def model_costs(model: nn.Module, input_size: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, params) of a whole model on one image of ``input_size`` (C, H, W): the convention of
    :func:`part_costs`, so a network counted here and a stitch are priced alike."""
    with _counting(model, input_size) as x:
        flops, _ = count_macs(model, x)
    return flops, num_params(model)


@torch.no_grad()
def part_costs(parts: nn.Module, input_size: tuple[int, ...]) -> PartCosts:
    """Count every part of an :class:`~snnet.anchors.AnchorParts` on one zero image."""
    with _counting(parts, input_size) as x:
        return count_parts(parts, x)


def count_parts(parts: nn.Module, x: torch.Tensor) -> PartCosts:
    """MACs of the stem on ``x``, of every block on what the one before gave, of the head; and the
    parameters of each part. Whatever ``x`` is (an image, a language model's next token)."""
    stem_flops, h = count_macs(parts.stem, x)
    block_flops = []
    for blk in parts.blocks:
        f, h = count_macs(blk, h)
        block_flops.append(f)
    head_flops, _ = count_macs(parts.head, h)
    return PartCosts(
        stem_flops, tuple(block_flops), head_flops,
        num_params(parts.stem), tuple(num_params(b) for b in parts.blocks), num_params(parts.head),
    )


@torch.no_grad()
def layer_flops(layer: nn.Module, spec) -> int:
    """MACs of a stitching layer on one activation of the given spec."""
    p = next(layer.parameters())
    if spec.layout == "nchw":
        shape = (1, spec.channels, *spec.spatial)
    else:
        shape = (1, *spec.spatial, spec.channels)
    return count_macs(layer, torch.zeros(shape, device=p.device, dtype=p.dtype))[0]
