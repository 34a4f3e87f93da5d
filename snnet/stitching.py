"""Stitching layers and their least-squares initialisation.

A stitching layer is a linear map on channels applied at every position: a Linear on tokens
(or on timm's NHWC Swin maps), a 1x1 convolution on CNN feature maps (NCHW), followed by a
change of layout when a CNN feeds a transformer. Before any training it is fitted in closed
form to map what the source anchor computes onto what the target anchor expects, on the
features of a few calibration images (the paper uses 100).

With ``rank > 0`` a layer is SN-Netv2's *low-rank* stitching layer: the least-squares weight
``W`` is frozen and training learns a LoRA update, ``W + (alpha / rank) * B @ A`` with ``A``
(rank x in) Kaiming-initialised and ``B`` (out x rank) zero, so training starts exactly at the
least-squares fit. The bias stays trainable, as in the authors' code. :meth:`StitchingLayer.merged`
folds the update into one plain layer (what export writes); the forward computes the same
merged weight, so a network evaluates exactly as its merged export.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import ActivationSpec, as_rows, stitchable
from .errors import NotStitchableError


class StitchingLayer(nn.Module):
    """Maps a source activation onto a target activation, position by position.

    ``rank`` > 0 makes it low-rank (see the module doc); ``alpha`` scales the update by
    ``alpha / rank`` (the authors' code uses 1).
    """

    def __init__(self, src: ActivationSpec, dst: ActivationSpec, rank: int = 0, alpha: float = 1.0) -> None:
        super().__init__()
        why = stitchable(src, dst)
        if why is not None:
            raise NotStitchableError(f"cannot build a stitching layer from {src} to {dst}: {why}")
        if rank < 0 or rank != int(rank):
            raise NotStitchableError(f"the rank of a low-rank stitching layer must be an integer >= 0, got {rank}")
        if rank and alpha <= 0:
            raise NotStitchableError(f"lora alpha must be > 0, got {alpha}")
        self.src_spec, self.dst_spec = src, dst
        self.src_layout, self.dst_layout = src.layout, dst.layout
        if src.layout == "nchw":
            self.proj: nn.Module = nn.Conv2d(src.channels, dst.channels, kernel_size=1)
        else:
            self.proj = nn.Linear(src.channels, dst.channels)
        self.rank, self.alpha = int(rank), float(alpha)
        if self.rank:
            self.proj.weight.requires_grad_(False)  # the least-squares fit stays; the update learns
            self.lora_a = nn.Parameter(torch.empty(self.rank, src.channels, device=self.proj.weight.device))
            self.lora_b = nn.Parameter(torch.zeros(dst.channels, self.rank, device=self.proj.weight.device))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        """The weight the layer applies (base + low-rank update), in ``proj.weight``'s shape."""
        w = self.proj.weight
        if not self.rank:
            return w
        return w + ((self.alpha / self.rank) * (self.lora_b @ self.lora_a)).reshape(w.shape)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.rank:
            h = self.proj(h)
        elif self.src_layout == "nchw":
            h = F.conv2d(h, self.weight(), self.proj.bias)
        else:
            h = F.linear(h, self.weight(), self.proj.bias)
        if self.src_layout == "nchw" and self.dst_layout == "nhwc":
            h = h.permute(0, 2, 3, 1)
        elif self.src_layout == "nhwc" and self.dst_layout == "nchw":
            h = h.permute(0, 3, 1, 2)
        return h

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Load ``y = x @ weight + bias`` (weight is in_channels x out_channels).

        A low-rank layer takes it as its frozen base and restarts its update at zero.
        """
        w = weight.t().to(self.proj.weight.dtype)
        self.proj.weight.copy_(w.reshape(self.proj.weight.shape))
        self.proj.bias.copy_(bias.to(self.proj.bias.dtype))
        if self.rank:
            self.lora_b.zero_()

    @torch.no_grad()
    def with_rank(self, rank: int, alpha: float = 1.0) -> "StitchingLayer":
        """A new layer computing the same map, with a fresh low-rank update of ``rank`` (0: plain)."""
        out = StitchingLayer(self.src_spec, self.dst_spec, rank, alpha).to(self.proj.weight.device, self.proj.weight.dtype)
        out.proj.weight.copy_(self.weight())
        out.proj.bias.copy_(self.proj.bias)
        out.train(self.training)
        return out

    def merged(self) -> "StitchingLayer":
        """One plain layer with the low-rank update folded in (itself when already plain)."""
        return self.with_rank(0) if self.rank else self

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}" if self.rank else ""


class LeastSquares:
    """Streaming ridge-stabilised least squares ``Y ≈ X W + b``.

    Sufficient statistics (Gram matrices) are accumulated in float64 batch by batch, so the
    features of every calibration batch are dropped as soon as they are counted and several
    block pairs can pour their features into one shared fit. Rows are shifted by the first
    batch's means before accumulating, which keeps the float64 sums well conditioned.
    """

    def __init__(self, in_features: int, out_features: int, ridge: float = 1e-5) -> None:
        self.ridge = ridge
        self.n = 0
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None
        self.sx = torch.zeros(in_features, dtype=torch.float64)
        self.sy = torch.zeros(out_features, dtype=torch.float64)
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.xty = torch.zeros(in_features, out_features, dtype=torch.float64)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add rows ``x`` (n, in) and their targets ``y`` (n, out)."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"rows differ: {x.shape[0]} inputs vs {y.shape[0]} targets")
        x, y = x.detach().float(), y.detach().float()
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0).to(x.device), y.mean(0).to(y.device)
        x, y = x - self.shift_x.to(x.device), y - self.shift_y.to(y.device)
        # float32 matmuls per batch (fast), float64 running sums (accurate)
        self.xtx += (x.t() @ x).double().cpu()
        self.xty += (x.t() @ y).double().cpu()
        self.sx += x.sum(0).double().cpu()
        self.sy += y.sum(0).double().cpu()
        self.n += x.shape[0]

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (in, out) and bias (out,), finite for any data, however few rows."""
        if self.n == 0:
            raise ValueError("no calibration rows were given to the least-squares fit")
        n = float(self.n)
        mx, my = self.sx / n, self.sy / n
        cxx = self.xtx / n - torch.outer(mx, mx)
        cxy = self.xty / n - torch.outer(mx, my)
        d = cxx.shape[0]
        # A tiny ridge relative to the mean variance makes a rank-deficient system (fewer rows
        # than channels, dead channels) solvable and returns the minimum-norm-like solution.
        scale = float(torch.trace(cxx)) / d
        lam = self.ridge * scale if scale > 0 else 1.0
        a = cxx + lam * torch.eye(d, dtype=torch.float64)
        try:
            w = torch.linalg.solve(a, cxy)
        except RuntimeError:
            w = torch.linalg.lstsq(a, cxy, driver="gelsd").solution
        if not torch.isfinite(w).all():
            w = torch.zeros_like(cxy)
        b = my - mx @ w
        # undo the shift: y - sy0 = (x - sx0) W + b  =>  y = x W + (b + sy0 - sx0 W)
        assert self.shift_x is not None and self.shift_y is not None
        sx0, sy0 = self.shift_x.double().cpu(), self.shift_y.double().cpu()
        b = b + sy0 - sx0 @ w
        return w.float(), b.float()


def fit_rows(h: torch.Tensor, spec: ActivationSpec) -> torch.Tensor:
    """Rows (positions x channels) of an activation, as the fit sees them."""
    return as_rows(h, spec.layout)
