"""Decoder language models from transformers as SN-Net anchors, and the stitched language model.

An anchor is any ``AutoModelForCausalLM`` of a kind an :class:`LMAdapter` knows (GPT-2,
GPT-NeoX/Pythia, Llama/SmolLM2, Qwen2/Qwen2.5), split as the vision anchors are:

* **stem**: the token embedding (and GPT-2's learned position embedding, and embedding
  dropout) -- ids to the residual stream;
* **blocks**: the decoder layers, run by the model class's own code;
* **head**: the final norm and the LM head -- residual stream to logits.

A stitching layer is a Linear from one residual stream to the other, applied at every position
(:class:`snnet.stitching.StitchingLayer` on ``tokens`` activations); the stitch space is
:class:`snnet.space.StitchSpace` unchanged (paired stitching with sliding windows where depths
agree, the authors' unpaired rule where they differ). Activation specs are per position
(``tokens[1, C]``): token ``t`` of one model stands for token ``t`` of the other, since the
anchors share one tokenizer.

A decoder layer needs more than the residual stream: its attention mask, its positions (GPT-2's
embedding, rotary angles) and its KV cache. Each anchor's :class:`LMContext` supplies them: the
parts keep their one-argument ``h -> h`` form, so routes, the shared-prefix evaluation of
:mod:`snnet.evaluate` and least squares work on LMs as on images. Without a bound
:class:`Step` a context gives a plain causal forward over the whole sequence (positions from
0, no padding, no cache): what evaluation, calibration and training need. :meth:`StitchedLM.forward`
binds a step with the caller's mask, positions and cache for the anchors on the route.

The KV cache of a route (:class:`RouteCache`) keeps one slot per layer *of each anchor*: every
transformers attention module indexes the cache by its own ``layer_idx``, so layer 3 of two
anchors must not share a slot. A cache belongs to the route that filled it; the stitch can
change between requests (a new cache each), not in the middle of one.

Costs are per generated token at a stated context length (:data:`DEFAULT_CONTEXT`, capped at the
fewest positions an anchor knows: :func:`stated_context`): the
multiply-accumulates of decoding one token at position ``context - 1`` over a KV cache of the
``context - 1`` tokens before it (``docs/language-models.md`` lists exactly what is counted).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from ..anchors import ActivationSpec, AnchorParts
from ..errors import CheckpointError, ConfigError, NotStitchableError, SnnetError
from ..flops import PartCosts, count_parts, layer_flops, num_params
from ..io import CHECKSUMS_KEY, PREVIOUS_SUFFIX, recorded_previous, verify_checksum
from ..model import CONFIG_NAME, WEIGHTS_NAME, StitchedBase
from ..results import Row
from ..report import progress as report_progress
from ..space import AnchorInfo, Segment, SpaceConfig, Stitch
from .lm_catalog import (TOKENIZER_FILES, LMSpec, check_token_ids, check_tokenizers, load_model, load_tokenizer,
                         resolve_lm)

__all__ = ["DEFAULT_CONTEXT", "LMAdapter", "LMContext", "LMParts", "RouteCache", "Step", "StitchedLM",
           "create_stitched_lm", "expand_lm_anchors", "lm_network_from_config", "lm_part_costs", "max_positions", "split_lm",
           "stated_context"]

# Context length at which FLOPs per generated token are stated unless asked otherwise: every
# shipped family handles it (GPT-2's 1024 positions are the fewest).
DEFAULT_CONTEXT = 1024
FORMAT = "snnet-lm"
FORMAT_VERSION = 1


# =================================================================================== one forward


@dataclass(frozen=True)
class Step:
    """What one forward gives every decoder layer on its route besides the residual stream."""

    position_ids: torch.Tensor  # (1 or batch, tokens)
    attention_mask: torch.Tensor | None = None  # 2-D padding mask over past + new tokens, or None
    cache: "RouteCache | None" = None


class LMContext:
    """Positions, attention masks, rotary angles and the KV cache for one anchor's layers.

    Masks and rotary angles are computed once per forward (the first layer that needs them) and
    shared by the anchor's other layers, as the model's own forward computes them once. ``anchor``
    is the anchor's index in the stitched network (which cache slots are its own).
    """

    def __init__(self, config: Any, adapter: type["LMAdapter"], rotary: nn.Module | None) -> None:
        self.config = config
        self.adapter = adapter
        self.rotary = rotary
        self.anchor = 0
        self.step: Step | None = None
        self._key: Any = None
        self._memo: dict[str, Any] = {}

    def bind(self, step: Step | None) -> None:
        self.step, self._key, self._memo = step, None, {}

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        if self.step is not None:
            return self.step.position_ids
        return torch.arange(x.shape[1], device=x.device)[None]

    def _cache(self) -> Any:
        return self.step.cache.for_anchor(self.anchor) if self.step is not None and self.step.cache is not None else None

    def layer_kwargs(self, index: int, h: torch.Tensor) -> dict[str, Any]:
        """The keyword arguments the anchor's model passes decoder layer ``index``."""
        key = ("step", id(self.step)) if self.step is not None else (tuple(h.shape[:2]), h.dtype, h.device)
        if key != self._key:
            self._key, self._memo = key, {}
        memo, cache, pos = self._memo, self._cache(), self.positions(h)
        kind = self.adapter.layer_type(self.config, index)
        if kind not in memo:  # before this layer writes the cache: its length is still the past's
            mask_fn = _mask_function(kind)
            memo[kind] = mask_fn(config=self.config, inputs_embeds=h, attention_mask=self.step.attention_mask
                                 if self.step is not None else None, cache=cache, position_ids=pos, layer_idx=index)
        if "rotary" not in memo:
            memo["rotary"] = self.rotary(h, pos) if self.rotary is not None else None
        return self.adapter.layer_kwargs(memo[kind], memo["rotary"], pos, cache)


def _mask_function(kind: str) -> Callable[..., Any]:
    from transformers import masking_utils

    if kind == "sliding_attention":
        return masking_utils.create_sliding_window_causal_mask
    return masking_utils.create_causal_mask


class RouteCache(Cache):
    """The KV cache of one route: each anchor's decoder layers write their own slots.

    A transformers attention module indexes its cache by its own ``layer_idx``; two anchors both
    have a layer 3, so each anchor on the route gets a cache of its own (:meth:`for_anchor`),
    laid out as the anchor's model lays its own out (full or sliding-window layers). This object
    is a transformers ``Cache`` whose layers are all those anchors' layers in order, so
    generation's cache operations (beam reordering, cropping) reach every slot; layers off the
    route stay empty. ``stitch`` is the route that fills it.
    """

    def __init__(self, configs: Mapping[int, Any], stitch: Stitch) -> None:
        groups = {k: DynamicCache(config=configs[k]).layers for k in sorted(configs)}
        if any(not g for g in groups.values()):
            raise NotStitchableError("an anchor on the route gave no cache layers: its config has no decoder layers")
        offsets: dict[int, tuple[int, int]] = {}
        flat: list[Any] = []
        for k, g in groups.items():
            offsets[k] = (len(flat), len(g))
            flat += g
        super().__init__(layers=flat)
        self.stitch = stitch
        self._offsets = offsets
        self._views: dict[int, Cache] = {}
        first = stitch.segments[0]
        self._first = offsets[first.anchor][0] + first.start

    def for_anchor(self, anchor: int) -> Cache:
        """The cache one anchor's layers read and write (its slots of this route's cache)."""
        view = self._views.get(anchor)
        if view is None:
            if anchor not in self._offsets:
                raise SnnetError(f"this KV cache holds no slots for anchor {anchor}: it was made for route "
                                 f"{self.stitch.name!r}")
            start, n = self._offsets[anchor]
            view = self._views[anchor] = Cache(layers=self.layers[start:start + n])
        return view

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the route has seen (its first layer's length, whatever ``layer_idx``)."""
        return self.layers[self._first].get_seq_length()


# =================================================================================== adapters


class LMAdapter:
    """Knows where one kind of transformers causal LM splits, and what its layers are passed.

    The pieces are named, not coded: ``base`` is the attribute holding the decoder stack, and
    ``names`` the attributes on it of the token embedding, learned positions, embedding
    dropout, layer list, final norm and rotary embedding (None: the kind has none); the LM head
    is the model's ``get_output_embeddings()``. An adapter matches its classes exactly (a
    subclass may compute something else); add a kind by subclassing and listing it in
    :data:`LM_ADAPTERS`.
    """

    kind: ClassVar[str] = "?"
    model_classes: ClassVar[tuple[str, ...]] = ()  # transformers class names, matched exactly
    base: ClassVar[str] = "model"
    names: ClassVar[dict[str, str | None]] = {"embed": "embed_tokens", "pos": None, "drop": None, "layers": "layers",
                                              "norm": "norm", "rotary": "rotary_emb"}
    cache_arg: ClassVar[str] = "cache"  # what the decoder layer calls its cache argument
    layer_types: ClassVar[bool] = False  # whether the model masks layers by config.layer_types

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        import transformers

        return any(getattr(transformers, name, None) is type(model) for name in cls.model_classes)

    @classmethod
    def pieces(cls, model: nn.Module) -> dict[str, Any]:
        """embed, pos, drop, layers (a list), norm, rotary (None where the kind has none), lm_head."""
        base = getattr(model, cls.base)
        out = {k: getattr(base, v) if v else None for k, v in cls.names.items()}
        out["layers"] = list(out["layers"])
        out["lm_head"] = model.get_output_embeddings()
        return out

    @classmethod
    def layer_type(cls, config: Any, index: int) -> str:
        types = getattr(config, "layer_types", None) if cls.layer_types else None
        return types[index] if types else "full_attention"

    @classmethod
    def layer_kwargs(cls, mask: Any, rotary: Any, positions: torch.Tensor, cache: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {"attention_mask": mask, cls.cache_arg: cache, "use_cache": cache is not None,
                              "position_ids": positions}
        if rotary is not None:
            kw["position_embeddings"] = rotary
        return kw


class GPT2Adapter(LMAdapter):
    """GPT-2: learned positions added in the stem, pre-LN blocks, final LayerNorm, tied head."""

    kind = "gpt2"
    model_classes = ("GPT2LMHeadModel",)
    base = "transformer"
    names = {"embed": "wte", "pos": "wpe", "drop": "drop", "layers": "h", "norm": "ln_f", "rotary": None}


class GPTNeoXAdapter(LMAdapter):
    """GPT-NeoX (Pythia): rotary on part of each head, parallel residual, untied head."""

    kind = "gpt_neox"
    model_classes = ("GPTNeoXForCausalLM",)
    base = "gpt_neox"
    names = {"embed": "embed_in", "pos": None, "drop": "emb_dropout", "layers": "layers", "norm": "final_layer_norm",
             "rotary": "rotary_emb"}
    cache_arg = "layer_past"


class LlamaAdapter(LMAdapter):
    """Llama (Llama 3.2, SmolLM2): RMSNorm, rotary, grouped-query attention, gated MLP."""

    kind = "llama"
    model_classes = ("LlamaForCausalLM",)


class Qwen2Adapter(LMAdapter):
    """Qwen2 (Qwen2.5): Llama's layout with QKV biases and per-layer full/sliding attention."""

    kind = "qwen2"
    model_classes = ("Qwen2ForCausalLM",)
    layer_types = True


LM_ADAPTERS: list[type[LMAdapter]] = [GPT2Adapter, GPTNeoXAdapter, LlamaAdapter, Qwen2Adapter]


# =================================================================================== parts


class LMStem(nn.Module):
    """Token ids to the residual stream: the anchor's embedding (+ learned positions, dropout)."""

    def __init__(self, embed: nn.Module, pos: nn.Module | None, drop: nn.Module | None, ctx: LMContext) -> None:
        super().__init__()
        self.embed, self.pos, self.drop = embed, pos, drop
        object.__setattr__(self, "ctx", ctx)  # shared, not a submodule

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        if self.pos is not None:
            h = h + self.pos(self.ctx.positions(input_ids)).to(h.device)
        return self.drop(h) if self.drop is not None else h


class DecoderBlock(nn.Module):
    """One decoder layer, run by its model class's own code with what its context supplies."""

    def __init__(self, layer: nn.Module, index: int, ctx: LMContext) -> None:
        super().__init__()
        self.layer, self.index = layer, index
        object.__setattr__(self, "ctx", ctx)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.layer(h, **self.ctx.layer_kwargs(self.index, h))
        return out[0] if isinstance(out, tuple) else out


class LMHead(nn.Module):
    """The residual stream to logits: final norm, then the LM head, over the first ``n_tokens``
    ids (the shared tokenizer's; the rest of a padded embedding matrix is never a real token)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head
        self.n_tokens: int | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(h))
        return logits if self.n_tokens is None else logits[..., : self.n_tokens]


class LMParts(AnchorParts):
    """A causal LM as stem -> decoder blocks -> head, sharing its parameters with the model."""

    def __init__(self, model: nn.Module, adapter: type[LMAdapter]) -> None:
        p = adapter.pieces(model)
        ctx = LMContext(model.config, adapter, p["rotary"])
        super().__init__(LMStem(p["embed"], p["pos"], p["drop"], ctx),
                         [DecoderBlock(layer, k, ctx) for k, layer in enumerate(p["layers"])],
                         LMHead(p["norm"], p["lm_head"]), layout="tokens", kind=adapter.kind)
        self.rotary = p["rotary"]  # a submodule, so .to() moves its buffers
        self.ctx = ctx
        object.__setattr__(self, "model", model)  # the whole transformers model (not a submodule): what an anchor exports as
        self.config = model.config
        self.adapter = adapter
        self.vocab_size = int(p["lm_head"].weight.shape[0])
        self.hidden_size = int(p["embed"].weight.shape[1])

    @property
    def tied(self) -> int:
        """Parameters the head shares with the stem (a tied LM head), counted once per network."""
        stem = {id(q) for q in self.stem.parameters()}
        return sum(q.numel() for q in self.head.parameters() if id(q) in stem)

    def spec(self) -> ActivationSpec:
        return ActivationSpec("tokens", self.hidden_size, (1,))


def split_lm(model: nn.Module) -> LMParts:
    """Split a transformers causal LM with the adapter of its exact class."""
    if isinstance(model, LMParts):
        return model
    for adapter in LM_ADAPTERS:
        if adapter.matches(model):
            return LMParts(model, adapter)
    known = ", ".join(c for a in LM_ADAPTERS for c in a.model_classes)
    raise NotStitchableError(f"snnet cannot split {type(model).__name__} language models; it knows {known}. "
                             "Add an LMAdapter for this class (snnet.families.causal_lm.LM_ADAPTERS)")


@contextlib.contextmanager
def _eager_attention(configs: Iterable[Any]) -> Iterator[None]:
    """Explicit attention matmuls (countable) instead of a fused kernel, for the duration."""
    saved = [(c, c._attn_implementation) for c in configs]
    try:
        for c, _ in saved:
            c._attn_implementation = "eager"
        yield
    finally:
        for c, v in saved:
            c._attn_implementation = v


@torch.no_grad()
def max_positions(config: Any) -> int | None:
    """The positions a model's config says it knows (``max_position_embeddings``, GPT-2's ``n_positions``), if any."""
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def fewest_positions(configs: Sequence[Any], labels: Sequence[str]) -> tuple[int, str] | None:
    """The fewest positions any of these anchors' configs knows, and that anchor's label (None: no config says)."""
    known = [(n, lab) for n, lab in zip((max_positions(c) for c in configs), labels) if n is not None]
    return min(known) if known else None


def net_positions(net: Any) -> tuple[int, str] | None:
    """:func:`fewest_positions` of a stitched language model's anchors: no route runs past it."""
    return fewest_positions([a.config for a in getattr(net, "anchors", ())], getattr(net, "labels", ()))


def stated_context(context: int | None, configs: Sequence[Any], labels: Sequence[str]) -> int:
    """The context length costs are stated at: ``context``, or by default :data:`DEFAULT_CONTEXT` capped at the
    fewest positions any anchor knows. A context longer than that is refused: no route could run it."""
    limit, who = fewest_positions(configs, labels) or (None, "")
    if context is None:
        return min(DEFAULT_CONTEXT, limit) if limit is not None else DEFAULT_CONTEXT
    if limit is not None and context > limit:
        raise ConfigError(f"a {context}-token context is longer than the {limit} positions {who} knows: use at most "
                          f"{limit} tokens (--context {limit}; in training, lower --data.block_size to at most {limit})")
    return int(context)


def lm_part_costs(config: Any, context: int) -> tuple[PartCosts, int]:
    """MACs per generated token at ``context`` and params of an anchor's parts, and its tied params.

    Counted on a meta-device copy built from the config (costs depend on the architecture
    only): the anchor prefills ``context - 1`` tokens into a KV cache (shapes only, nothing is
    computed on the meta device), then decodes one token at position ``context - 1`` under
    :func:`snnet.flops.count_macs` with eager attention, so the attention scores and weighted sum
    over all ``context`` keys are counted with the projections, the MLP and the LM head.
    """
    from transformers import AutoModelForCausalLM

    if context < 1:
        raise ConfigError(f"the context length must be >= 1 token, got {context}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parts = split_lm(model).eval()
    ctx = parts.ctx
    with _eager_attention([model.config]):
        cache = RouteCache({0: model.config}, Stitch(0, "count", (Segment(0, 0, parts.depth),)))
        if context > 1:
            ctx.bind(Step(torch.arange(context - 1, device="meta")[None], None, cache))
            parts.run(parts.stem(torch.zeros(1, context - 1, dtype=torch.long, device="meta")))
        ctx.bind(Step(torch.tensor([[context - 1]], device="meta"), None, cache))
        costs = count_parts(parts, torch.zeros(1, 1, dtype=torch.long, device="meta"))
        ctx.bind(None)
    return costs, parts.tied


# =================================================================================== the network


@dataclass(frozen=True)
class LMInitReport:
    """What the least-squares initialisation did."""

    sequences: int
    tokens: int
    layers: int
    seconds: float


class StitchedLM(StitchedBase):
    """Language-model anchors ordered by cost, the stitching layers between them, the stitch space.

    The verbs are :class:`snnet.model.StitchedNet`'s (shared through :class:`snnet.model.StitchedBase`):
    :meth:`select` a stitch (or a budget) outside forward, :meth:`route`, :meth:`costs`,
    :meth:`init_stitching`, :meth:`save_pretrained` / :meth:`from_pretrained`. ``forward(input_ids,
    attention_mask, position_ids, cache, logits_to_keep)`` returns logits over the first
    :attr:`vocab_size` ids, those of the shared tokenizer. :func:`snnet.families.lm_hf.as_transformers`
    presents it as a transformers ``PreTrainedModel`` whose ``generate()`` runs the active stitch.
    """

    _format = FORMAT
    _version = FORMAT_VERSION
    _what = "stitched language model"

    def __init__(
        self,
        anchors: Sequence[LMParts],
        labels: Sequence[str],
        *,
        config: SpaceConfig = SpaceConfig(),
        specs: Sequence[LMSpec | None] | None = None,
        context: int | None = None,
        vocab_size: int | None = None,
        tokenizer: Any = None,
        lora_rank: int = 0,
        lora_alpha: float = 1.0,
    ) -> None:
        super().__init__()
        if len(anchors) < 2:
            raise NotStitchableError(f"a family needs at least two anchors to stitch, got {len(anchors)}")
        if len(labels) != len(anchors):  # else an IndexError below, or (more labels) the extra ones dropped silently
            raise NotStitchableError(f"{len(labels)} labels {list(labels)} for {len(anchors)} anchors: give one label per anchor")
        if len(set(labels)) != len(labels):
            raise NotStitchableError(f"two anchors have the same name in {list(labels)}; give each a distinct label")
        check_token_ids([p.config for p in anchors], labels)
        specs = list(specs) if specs is not None else [None] * len(anchors)
        self.context = stated_context(context, [p.config for p in anchors], labels)
        costs = [lm_part_costs(p.config, self.context) for p in anchors]
        # anchors in order of cost: stitches go from the cheaper to the dearer neighbour
        order = sorted(range(len(anchors)), key=lambda k: (costs[k][0].total[0], costs[k][0].total[1]))
        self.anchors = nn.ModuleList([anchors[k] for k in order])
        self.labels = tuple(labels[k] for k in order)
        self.specs = tuple(specs[k] for k in order)
        self._part_costs: dict[int, list[tuple[PartCosts, int]]] = {self.context: [costs[k] for k in order]}
        self._costs: dict[int, list[Row]] = {}
        for k, p in enumerate(self.anchors):
            p.ctx.anchor = k
        self.tokenizer = tokenizer
        self.vocab_size = self._vocab_size(vocab_size, tokenizer)
        for p in self.anchors:
            p.head.n_tokens = self.vocab_size if self.vocab_size < p.vocab_size else None
        infos = [AnchorInfo(lab, (p.depth,), (0,), (p.spec(),) * (p.depth + 1), "window")
                 for lab, p in zip(self.labels, self.anchors)]
        with torch.device(next(self.anchors[0].parameters()).device):  # meta anchors: meta stitching layers too
            self._init_space(infos, config, lora_rank, lora_alpha)
        # anchors loaded in one dtype (dtype=torch.bfloat16): stitching layers in it too, else a stitched route's
        # matmul fails on the dtypes (a least-squares fit is solved in float64 and cast on loading)
        dtypes = {q.dtype for p in self.anchors for q in p.parameters() if q.is_floating_point()}
        if len(dtypes) == 1:
            self.stitch_layers.to(dtype=dtypes.pop())

    def _vocab_size(self, vocab_size: int | None, tokenizer: Any) -> int:
        smallest = min(p.vocab_size for p in self.anchors)
        n = vocab_size if vocab_size is not None else (len(tokenizer) if tokenizer is not None else smallest)
        if not 1 <= n <= smallest:
            raise NotStitchableError(f"the shared vocabulary has {n} tokens but the smallest anchor head predicts "
                                     f"{smallest}: every anchor must have a logit for every token of the tokenizer")
        return int(n)

    # ------------------------------------------------------------------ forward
    def new_cache(self, stitch: int | str | Stitch | None = None) -> RouteCache:
        """An empty KV cache for ``stitch`` (default: the active one)."""
        s = self._active if stitch is None else self.space[stitch]
        return RouteCache({k: self.anchors[k].config for k in set(s.anchors)}, s)

    @contextlib.contextmanager
    def bound(self, step: Step, anchors: Iterable[int]) -> Iterator[None]:
        """Give the listed anchors' layers ``step`` (mask, positions, cache) for the duration."""
        ctxs = [self.anchors[k].ctx for k in set(anchors)]
        for c in ctxs:
            c.bind(step)
        try:
            yield
        finally:
            for c in ctxs:
                c.bind(None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits ``(batch, tokens, vocab_size)`` of the active stitch (the last ``logits_to_keep`` positions if > 0).

        ``cache`` (from :meth:`new_cache`) makes this a prefill or decoding step: it is read and
        extended by the route's own layers. Positions default to the cache's length onwards.
        """
        s = self._active
        if cache is not None and getattr(cache, "stitch", None) != s:
            made = getattr(getattr(cache, "stitch", None), "name", type(cache).__name__)
            raise SnnetError(f"this KV cache belongs to route {made!r} but the active stitch is {s.name!r}: the "
                             "stitch can change between requests, not within one; start a new cache (net.new_cache())")
        if input_ids.ndim != 2:
            raise SnnetError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        modules = self._routes.get(s.id)
        if modules is None:
            modules = self._routes[s.id] = self.route(s).modules()
        with self.bound(Step(position_ids, attention_mask, cache), s.anchors):
            h = input_ids
            for m in modules[:-1]:
                h = m(h)
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            return modules[-1](h)

    # ------------------------------------------------------------------ costs
    def part_costs(self, context: int | None = None) -> list[tuple[PartCosts, int]]:
        """Every anchor's part costs (per generated token at ``context``) and tied params."""
        # a context past the positions an anchor knows is refused, as at construction: no route could run it
        context = stated_context(int(context or self.context), [p.config for p in self.anchors], self.labels)
        if context not in self._part_costs:
            self._part_costs[context] = [lm_part_costs(p.config, context) for p in self.anchors]
        return self._part_costs[context]

    def costs(self, context: int | None = None) -> list[Row]:
        """MACs per generated token at ``context`` tokens (default :attr:`context`) and params of every
        network, each the sum of its parts (a tied head and embedding counted once)."""
        context = stated_context(int(context or self.context), [p.config for p in self.anchors], self.labels)
        if context not in self._costs:
            pcs = self.part_costs(context)
            plain = [layer.merged() for layer in self.stitch_layers]
            lflops = [layer_flops(layer, slot.src_spec) for slot, layer in zip(self.space.layers, plain)]
            self._costs[context] = self._route_costs([pc for pc, _ in pcs], lflops, [num_params(x) for x in plain],
                                                     [tied for _, tied in pcs])
        return self._costs[context]

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_stitching(self, batches: Iterable[Any], max_tokens: int = 8192, progress: bool = False) -> LMInitReport:
        """Fit every stitching layer by least squares on the hidden states of calibration text.

        ``batches`` yield token ids ``(batch, tokens)`` (or ``(ids, ...)`` tuples, or dicts with
        ``input_ids``, as :func:`snnet.text.text_loader` gives). A layer maps what its source
        anchor's residual stream holds after the cut onto what the target's holds where the route
        enters it, at every position. At most ``max_tokens`` positions are used.
        """
        t0 = time.perf_counter()
        device = next(self.parameters()).device
        room = net_positions(self)
        seen = {"tokens": 0}
        bar = report_progress(max_tokens, "least-squares init", "tok", progress)

        def inputs() -> Iterator[torch.Tensor]:
            for batch in batches:
                left = max_tokens - seen["tokens"]
                if left <= 0:
                    return
                ids = _ids(batch)
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):  # else an IndexError
                    bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())  # from inside an embedding
                    raise SnnetError(f"calibration token id {bad} is outside the network's {self.vocab_size}-token "
                                     "vocabulary: tokenise the text with the network's own tokenizer (net.tokenizer)")
                if room is not None and ids.shape[1] > room[0]:
                    # the fit needs hidden states at positions the anchors know: a longer sequence (a text loader's
                    # block of block_size + 1 ids, its targets included) is fitted on its first ones; past them a
                    # learned position embedding failed with "index out of range in self"
                    ids = ids[:, :room[0]]
                ids = ids[: max(1, left // ids.shape[1])].to(device)
                seen["tokens"] += ids.numel()
                bar.update(ids.numel())
                yield ids

        was_training = self.training
        self.eval()
        try:
            sequences = self._fit_stitching(inputs())
        finally:
            self.train(was_training)
            bar.close()
        if sequences == 0:
            raise SnnetError("no calibration text: the batches given to init_stitching yielded nothing")
        return LMInitReport(sequences, seen["tokens"], len(self.stitch_layers), time.perf_counter() - t0)

    # ------------------------------------------------------------------ save / load
    def config_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "anchors": [{"label": lab, "kind": p.kind, "spec": spec.to_dict() if spec else None,
                         "config": p.config.to_dict()} for lab, p, spec in zip(self.labels, self.anchors, self.specs)],
            "space": self.space.config.to_dict(),
            "context": self.context,
            "vocab_size": self.vocab_size,
            "stitches": [s.name for s in self.space],
            "active": self._active.name,
            **({} if self.lora_rank == 0 else {"stitching": {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha}}),
        }

    def save_pretrained(self, directory: str | os.PathLike, state: Mapping[str, torch.Tensor] | None = None,
                        extra: Mapping[str, Callable[[Path], object]] | None = None) -> Path:
        """Write ``config.json`` (every anchor's transformers config, the space, the active stitch)
        and ``model.safetensors``, each atomically, and the tokenizer's files beside them when set: written
        before ``config.json`` and recorded in it, as the weights are (a save stopped between its files loads
        the earlier save's tokenizer with its weights), and, when this save has no tokenizer, the files of the
        earlier save's removed (:meth:`StitchedBase.save_pretrained`): they were taken for the new network's.

        With LoRA adapters on the anchors (:mod:`snnet.families.lm_lora`) the weights are written with the
        adapters merged, and ``adapters.safetensors`` beside them holds only the adapters and stitching layers.
        Without adapters, the ``adapters.safetensors`` of a save this one replaces is removed once the new
        ``config.json`` is in (it was taken for the new network's)."""
        from ..io import previous_of, safetensors_kind
        from .lm_lora import ADAPTERS_NAME, adapter_state, has_lora, merged_state

        if state is None and any(p.device.type == "meta" for p in self.parameters()):  # before a folder is made
            raise CheckpointError("this network holds no weights (built on the meta device, to list and price its "
                                  "space): build it with weights to save it")
        extra = dict(extra or {})
        lora = has_lora(self)
        if lora:
            from safetensors.torch import save_file

            full = dict(state or self.state_dict())
            trained = {k: v.detach().contiguous().cpu() for k, v in adapter_state(full).items()}
            extra[ADAPTERS_NAME] = lambda p: save_file(trained, str(p), metadata={"snnet": _ADAPTERS_KIND})
            state = merged_state(self, full)
        with tempfile.TemporaryDirectory() as tmp:  # the tokenizer names its files as it writes them
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
                for p in sorted(Path(tmp).iterdir()):
                    extra[p.name] = functools.partial(shutil.copyfile, p)
            directory = super().save_pretrained(directory, state, extra)
        stale = directory / ADAPTERS_NAME  # (a save from before adapters were recorded in config.json)
        if not lora and stale.is_file() and safetensors_kind(stale) == _ADAPTERS_KIND:  # snnet's only: never a user's file
            stale.unlink()
            previous_of(stale).unlink(missing_ok=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "StitchedLM":
        """Rebuild a network written by :meth:`save_pretrained` (no download: the anchors are
        rebuilt from their saved configs and the weights read from the file)."""
        cfg, w_path = cls._read_saved(directory)
        entries = cfg["anchors"]
        try:
            parts = [split_lm(_model_from_config(e["config"])) for e in entries]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{w_path.parent} holds an anchor config transformers cannot build ({e})") from e
        layers = cfg.get("stitching", {})
        net = cls(parts, [e["label"] for e in entries], config=SpaceConfig.from_dict(cfg["space"]),
                  specs=[LMSpec.from_dict(e["spec"]) if e.get("spec") else None for e in entries],
                  context=int(cfg.get("context", DEFAULT_CONTEXT)), vocab_size=cfg.get("vocab_size"),
                  tokenizer=_saved_tokenizer(Path(directory), cfg), lora_rank=int(layers.get("lora_rank", 0)),
                  lora_alpha=float(layers.get("lora_alpha", 1.0)))
        net._load_saved(cfg, w_path, map_location)
        return net


# the "snnet" entry of adapters.safetensors' metadata: what tells snnet's file from one of the user's own
_ADAPTERS_KIND = "lora"


def _ids(batch: Any) -> torch.Tensor:
    """Token ids from a batch: a tensor, an (ids, ...) tuple, or a dict with ``input_ids``."""
    if isinstance(batch, Mapping):
        batch = batch["input_ids"]
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.ndim != 2 or batch.dtype not in (torch.long, torch.int):
        raise SnnetError("calibration batches must hold token ids of shape (batch, tokens)")
    return batch.long()


def _model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """An anchor built from a saved config dict without initialising weights (they are loaded next)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = AutoConfig.for_model(**dict(config))
    with no_init_weights():
        return AutoModelForCausalLM.from_config(cfg).eval()


def _saved_tokenizer(directory: Path, cfg: Mapping[str, Any]) -> Any:
    """The tokenizer saved in ``directory`` (None without one). After a save stopped between its files and its
    config.json (``cfg``, the one in place), the tokenizer files that config.json records are read from the bytes
    the save kept (``<name>.previous``): the tokenizer saved with the weights that load. Every other tokenizer file
    is checked against config.json's SHA-256 (:func:`_check_tokenizer_files`)."""
    if not any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    kept = {p.name: previous for p in directory.iterdir() if p.name != WEIGHTS_NAME
            and (previous := recorded_previous(p, cfg)) is not None}
    _check_tokenizer_files(directory, cfg, set(kept))
    try:
        if not kept:
            return AutoTokenizer.from_pretrained(str(directory))
        with tempfile.TemporaryDirectory() as tmp:  # the folder as the earlier save left it, linked, not copied
            for p in directory.iterdir():
                if p.is_file() and not p.name.endswith(PREVIOUS_SUFFIX):
                    os.symlink((kept.get(p.name) or p).resolve(), Path(tmp) / p.name)
            return AutoTokenizer.from_pretrained(tmp)
    except Exception as e:  # noqa: BLE001 -- a damaged file fails in json, transformers or tokenizers (plain Exception)
        text = str(e).strip()
        raise CheckpointError(f"the tokenizer saved in {directory} does not load ({type(e).__name__}: "
                              f"{text.splitlines()[0] if text else 'no message'}): {_RESTORE_TOKENIZER}") from e


_RESTORE_TOKENIZER = "restore its tokenizer files from a backup, or copy those of its anchors (they share one)"


def _check_tokenizer_files(directory: Path, cfg: Mapping[str, Any], kept: set[str]) -> None:
    """Check the tokenizer files in ``directory`` (those AutoTokenizer reads, but the ``kept`` ones: an interrupted
    save's earlier bytes, checked already) against the SHA-256s config.json (``cfg``) records, as the weights are: a
    damaged one is refused. One it records none for (saved before snnet recorded tokenizer files, or put in since)
    loads with an UnverifiedFileWarning naming it, once per process. It is not removed by a save: nothing tells the
    earlier save's file from one the user copied in (as the error of a tokenizer that does not load says to)."""
    recorded = cfg.get(CHECKSUMS_KEY)
    for p in sorted(directory.iterdir()):
        if (p.name not in kept and not p.name.endswith(PREVIOUS_SUFFIX) and p.is_file()
                and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in TOKENIZER_FILES)):
            fix = (_RESTORE_TOKENIZER if isinstance(recorded, Mapping) and p.name in recorded else
                   "save the network again (save_pretrained records its tokenizer's files; a tokenizer file that save "
                   "does not write is not its tokenizer's: delete it)")
            verify_checksum(p, cfg, directory / CONFIG_NAME, fix, error=CheckpointError)


# =================================================================================== building


def expand_lm_anchors(anchors: str | Sequence[Any]) -> list[Any]:
    """``"pythia"`` -> its members; ``"a,b,c"`` -> the names; a list stays as it is."""
    if not isinstance(anchors, str):
        return list(anchors)
    from .lm_catalog import expand_lm

    names = expand_lm(anchors)
    if names is None:
        names = [n.strip() for n in anchors.split(",") if n.strip()]
    return names


def create_stitched_lm(
    anchors: str | Sequence[str | LMSpec | nn.Module],
    *,
    weights: bool = False,
    device: str | torch.device | None = None,
    dtype: Any = None,
    labels: Sequence[str] | None = None,
    context: int | None = None,
    tokenizer: Any = None,
    load_tokenizers: bool = False,
    kernel_size: int = 2,
    stride: int = 1,
    nearest: bool = True,
    unpaired: str = "reference",
    two_way: bool = False,
    chains: bool = False,
    routes: Sequence[str] | None = None,
    lora_rank: int = 0,
    lora_alpha: float = 1.0,
) -> StitchedLM:
    """Stitch a family of causal language models into one switchable network.

    ``anchors`` is a family (``"pythia"``, ``"qwen2.5"``, ``"gpt2"``, ``"smollm2"``, ``"llama3.2"``),
    comma-separated names (``"pythia-160m,pythia-410m"``: snnet's member names, hub ids, local
    folders), or a list of names, :class:`LMSpec` s or loaded transformers models. ``weights=True``
    loads every named anchor through ``AutoModelForCausalLM.from_pretrained`` (a hub id downloads;
    a folder reads its files); otherwise they are built at random init from their configs, and
    ``device="meta"`` builds them without memory: enough to list and price the space.

    ``load_tokenizers=True`` loads every anchor's tokenizer and refuses a family whose tokenizers
    differ (a clear error naming what differs); the shared tokenizer then sets :attr:`StitchedLM.vocab_size`.
    """
    names = expand_lm_anchors(anchors)
    if len(names) < 2:
        raise NotStitchableError(f"a family needs at least two anchors to stitch, got {len(names)} ({anchors!r})")
    if device is not None and torch.device(device).type == "meta" and weights:
        raise ConfigError("a network on the meta device holds no weights: drop weights=True")
    specs: list[LMSpec | None] = [resolve_lm(a) if isinstance(a, str) else a if isinstance(a, LMSpec) else None
                                  for a in names]  # every name checked before anything is built
    models = []
    for a, spec in zip(names, specs):
        if spec is None:
            models.append(a)
        elif device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):
                models.append(load_model(spec, weights=False, dtype=dtype))
        else:
            models.append(load_model(spec, weights=weights, dtype=dtype))
    if labels is None:
        labels = [spec.label if spec is not None else _model_label(m, k) for k, (m, spec) in enumerate(zip(models, specs))]
    if load_tokenizers:
        missing = [lab for lab, s in zip(labels, specs) if s is None]
        if missing:
            raise ConfigError(f"load_tokenizers needs named anchors; {missing} were given as models: pass tokenizer=")
        toks = [load_tokenizer(s) for s in specs]  # type: ignore[arg-type]
        check_tokenizers(toks, labels)
        tokenizer = tokenizer or toks[0]
    config = SpaceConfig(kernel_size, stride, nearest, None, None, unpaired, two_way, chains,
                         tuple(routes) if routes is not None else None)
    parts = [split_lm(m) for m in models]
    net = StitchedLM(parts, labels, config=config, specs=specs, context=context, tokenizer=tokenizer,
                     lora_rank=lora_rank, lora_alpha=lora_alpha)
    return net.to(device) if device is not None and torch.device(device).type != "meta" else net


def lm_network_from_config(model: Any, space: SpaceConfig, context: int) -> StitchedLM:
    """The stitched language model a training configuration names (``task: causal-lm``): its
    ``model.init`` folder, or its anchors (loaded through ``from_pretrained`` unless
    ``model.pretrained`` is false) with their shared tokenizer, stitched into ``space``, FLOPs per
    token stated at ``context`` tokens (the block length trained at).

    ``model`` is a :class:`snnet.config.ModelConfig`; the settings that only images have are refused
    in one line rather than ignored."""
    given = [name for name, bad in (("model.weights", model.weights is not None), ("model.num_classes",
             model.num_classes is not None), ("model.drop_path", model.drop_path > 0), ("space.stages",
             space.stages is not None), ("space.rule", space.rule is not None), ("space.cut", space.cut != "block"))
             if bad]
    if given:
        raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for image models; a causal-lm run "
                          "names its anchors (folders hold their weights) and stitches every decoder layer: drop "
                          f"{'it' if len(given) == 1 else 'them'}")
    if model.init is not None:
        from ..model import saved_network

        net: StitchedLM = saved_network(StitchedLM, model.init, space)  # type: ignore[assignment]
        # stated at the block length trained at, as for a network built from its anchors (not the saved one's)
        net.context = stated_context(context, [p.config for p in net.anchors], net.labels)
    else:
        names = expand_lm_anchors(model.anchors)
        for name in names:
            resolve_lm(name)  # a name that is no language model (the tree's default 'fmnist') fails with the choices
        net = create_stitched_lm(names, weights=model.pretrained is not False, load_tokenizers=True, context=context,
                                 kernel_size=space.kernel_size, stride=space.stride, nearest=space.nearest,
                                 unpaired=space.unpaired, two_way=space.two_way, chains=space.chains,
                                 routes=space.routes, lora_rank=space.lora_rank or 0, lora_alpha=space.lora_alpha)
    if model.anchor_lora_rank:
        from .lm_lora import add_lora

        add_lora(net, model.anchor_lora_rank, model.anchor_lora_alpha, model.anchor_lora_targets)
    return net


def _model_label(model: nn.Module, index: int) -> str:
    name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
    return Path(name).name.lower() if name else f"{type(model).__name__.lower()}{index}"
