"""A stitched language model as transformers sees one: ``generate()``, and routes exported to disk.

:class:`StitchedLMForCausalLM` wraps a live :class:`~snnet.families.causal_lm.StitchedLM` (sharing
its modules) as a ``PreTrainedModel`` + ``GenerationMixin``, so transformers' own ``generate()``
runs the active stitch: greedy or sampled (temperature, top-p), ``max_new_tokens``, stop strings,
with the route's :class:`~snnet.families.causal_lm.RouteCache` (one cache slot per layer of each
anchor) created for every call. Select another stitch and the next call runs it.

:func:`export_route` writes one network of the space as a standalone model folder:

* an **anchor**: the anchor's own transformers model (``GPT2LMHeadModel``, ``Qwen2ForCausalLM``
  ...) through its ``save_pretrained``: plain transformers, loadable anywhere;
* a **stitch**: a stitching layer maps one residual stream onto another between two decoder
  layers; a plain transformers architecture has no place for that map (it cannot be folded into
  the neighbouring weights through the normalisations of the later layers), so the route is
  written as :class:`SnnetRouteForCausalLM` holding only the route's weights. It loads through
  ``AutoModelForCausalLM.from_pretrained(folder)`` once this module is imported (``import
  snnet.lm`` does it), or without importing anything with ``trust_remote_code=True`` (the folder
  carries a two-line module naming these classes).

Either way the export is read back and its logits compared with the route's (within ``1e-5``)
before the folder is put in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import ExportError, SnnetError
from ..space import Segment, Stitch
from ..stitching import StitchingLayer
from .causal_lm import LMParts, RouteCache, Step, StitchedLM, split_lm

__all__ = ["ROUTE_MODEL_TYPE", "SnnetRouteConfig", "SnnetRouteForCausalLM", "StitchedLMConfig", "StitchedLMForCausalLM",
           "as_transformers", "export_route", "verify_export"]

ROUTE_MODEL_TYPE = "snnet-lm-route"
REMOTE_CODE = "modeling_snnet_route.py"
TOLERANCE = 1e-5


def _token_config(config: Any) -> dict[str, Any]:
    return {k: getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _lm_output(logits: torch.Tensor, labels: torch.Tensor | None, cache: Any) -> CausalLMOutputWithPast:
    loss = None
    if labels is not None:
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=-100)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)


def _new_cache(generation_config: Any, model_kwargs: dict[str, Any], make: Any) -> None:
    """Put a fresh route cache in ``model_kwargs`` unless the caller gave one or asked for none."""
    if model_kwargs.get("cache") is not None:
        if not isinstance(model_kwargs["cache"], RouteCache):
            raise SnnetError("a stitched language model generates with its own KV cache (one slot per layer of each "
                             "anchor): pass none, or one from net.new_cache()")
        model_kwargs["cache"]._is_user_defined = True
        return
    if generation_config.use_cache is False:
        return
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise SnnetError(f"cache_implementation={generation_config.cache_implementation!r} is not supported by a "
                         "stitched language model: it keeps a dynamic cache per anchor (leave the option unset)")
    model_kwargs["cache"] = make()


# =================================================================================== the live network


class StitchedLMConfig(PretrainedConfig):
    """What transformers needs to know of a stitched LM to generate: vocabulary and special tokens."""

    model_type = "snnet-stitched-lm"

    def __init__(self, vocab_size: int = 0, snnet: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.snnet = snnet or {}
        super().__init__(**kwargs)


def _keep_weights(module: nn.Module) -> None:
    """Mark every submodule as initialised, so ``post_init`` (which initialises whatever transformers
    did not build itself) leaves the weights of a network being wrapped as they are."""
    for m in module.modules():
        m._is_hf_initialized = True


class _SnnetCausalLM(PreTrainedModel, GenerationMixin):
    """What both wrappers share: a forward over token ids through ``inner`` (a module taking
    ``(input_ids, attention_mask, position_ids, cache, logits_to_keep)`` with a ``new_cache()``),
    and generation with a fresh route cache."""

    main_input_name = "input_ids"

    @property
    def inner(self) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, labels: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise SnnetError("a stitched language model takes input_ids (token ids), not inputs_embeds")
        if use_cache and cache is None:
            cache = self.inner.new_cache()
        logits = self.inner(input_ids, attention_mask, position_ids, cache, logits_to_keep)
        return _lm_output(logits, labels, cache)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict[str, Any], *args: Any,
                                      **kwargs: Any) -> None:
        _new_cache(generation_config, model_kwargs, self.inner.new_cache)


class StitchedLMForCausalLM(_SnnetCausalLM):
    """A live :class:`StitchedLM` as a transformers causal LM (sharing its modules, not a copy).

    Build it with :func:`as_transformers`; ``generate()`` runs the active stitch and makes a
    fresh :class:`RouteCache` for it on every call.
    """

    config_class = StitchedLMConfig
    base_model_prefix = "net"

    def __init__(self, config: StitchedLMConfig, net: StitchedLM | None = None) -> None:
        super().__init__(config)
        if net is None:
            raise SnnetError("StitchedLMForCausalLM wraps a live network: use snnet.lm.as_transformers(net) "
                             "(a saved network loads with StitchedLM.from_pretrained)")
        self.net = net
        _keep_weights(net)
        self.post_init()

    @property
    def inner(self) -> nn.Module:
        return self.net

    def get_input_embeddings(self) -> nn.Module:
        return self.net.anchors[self.net.active.src].stem.embed


def as_transformers(net: StitchedLM) -> StitchedLMForCausalLM:
    """``net`` as a transformers ``PreTrainedModel`` + ``GenerationMixin`` sharing its modules:
    ``generate()`` runs the active stitch (select another and the next call runs that one)."""
    config = StitchedLMConfig(vocab_size=net.vocab_size, **_token_config(net.anchors[0].config))
    return StitchedLMForCausalLM(config, net)


# =================================================================================== one route, standalone


class SnnetRouteConfig(PretrainedConfig):
    """An exported route: the configs of the anchors it runs through, its segments and layers.

    ``anchors`` are the anchors' transformers config dicts (in route order of first use) with
    their labels; ``segments`` are ``[anchor, start, stop]``; ``stitching_layers`` the channel
    counts ``[in, out]`` of the layer after each segment but the last.
    """

    model_type = ROUTE_MODEL_TYPE

    def __init__(self, route: str = "", anchors: Sequence[dict[str, Any]] = (), labels: Sequence[str] = (),
                 segments: Sequence[Sequence[int]] = (), stitching_layers: Sequence[Sequence[int]] = (),
                 vocab_size: int = 0, **kwargs: Any) -> None:
        self.route = route
        self.anchors = [dict(a) for a in anchors]
        self.labels = list(labels)
        self.segments = [list(s) for s in segments]
        self.stitching_layers = [list(s) for s in stitching_layers]
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class LMRoute(nn.Module):
    """One route's modules only: the first anchor's stem, each segment's decoder layers with the
    stitching layer after it, the last anchor's head. Each anchor keeps its own context (masks,
    rotary angles) and cache slots, as in the stitched network.

    ``parts`` maps the anchor indices the route's segments name to those anchors' parts; only
    the modules on the route are kept.
    """

    def __init__(self, parts: dict[int, LMParts], stitch: Stitch, layers: Sequence[StitchingLayer],
                 vocab_size: int) -> None:
        super().__init__()
        self.stitch_route = stitch
        self.configs = {k: p.config for k, p in parts.items()}
        self.ctxs = [p.ctx for p in parts.values()]
        self.stem = parts[stitch.src].stem
        self.segments = nn.ModuleList([nn.ModuleList(parts[seg.anchor].blocks[seg.start:seg.stop]) for seg in stitch.segments])
        self.stitching = nn.ModuleList(layers)
        self.head = parts[stitch.anchors[-1]].head
        self.rotary = nn.ModuleList([p.rotary for p in parts.values() if p.rotary is not None])  # moved with the route
        self.vocab_size = vocab_size

    def new_cache(self) -> RouteCache:
        return RouteCache(self.configs, self.stitch_route)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, logits_to_keep: int = 0) -> torch.Tensor:
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)[None]
        step = Step(position_ids, attention_mask, cache)
        for c in self.ctxs:
            c.bind(step)
        try:
            h = self.stem(input_ids)
            for k, blocks in enumerate(self.segments):
                if k:
                    h = self.stitching[k - 1](h)
                for blk in blocks:
                    h = blk(h)
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            return self.head(h)
        finally:
            for c in self.ctxs:
                c.bind(None)


def _route_from_config(config: SnnetRouteConfig) -> LMRoute:
    """The route's modules, built from an exported config (weights are loaded next)."""
    from ..anchors import ActivationSpec

    parts = {}
    for k, cfg in enumerate(config.anchors):
        parts[k] = split_lm(AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)))
        parts[k].ctx.anchor = k
    segments = tuple(Segment(int(a), int(s), int(e)) for a, s, e in config.segments)
    stitch = Stitch(0, config.route, segments, tuple(range(len(segments) - 1)))
    layers = [StitchingLayer(ActivationSpec("tokens", int(i), (1,)), ActivationSpec("tokens", int(o), (1,)))
              for i, o in config.stitching_layers]
    route = LMRoute(parts, stitch, layers, int(config.vocab_size))
    route.head.n_tokens = route.vocab_size if route.vocab_size < parts[stitch.anchors[-1]].vocab_size else None
    return route


class SnnetRouteForCausalLM(_SnnetCausalLM):
    """One exported route of a stitched LM, as a transformers causal LM (see the module doc)."""

    config_class = SnnetRouteConfig
    base_model_prefix = "route"

    def __init__(self, config: SnnetRouteConfig, route: LMRoute | None = None) -> None:
        super().__init__(config)
        if route is not None:
            _keep_weights(route)
        self.route = route if route is not None else _route_from_config(config)
        self.post_init()

    @property
    def inner(self) -> nn.Module:
        return self.route

    def get_input_embeddings(self) -> nn.Module:
        return self.route.stem.embed


AutoConfig.register(ROUTE_MODEL_TYPE, SnnetRouteConfig, exist_ok=True)
AutoModelForCausalLM.register(SnnetRouteConfig, SnnetRouteForCausalLM, exist_ok=True)

# the module a route folder carries, so trust_remote_code=True loads it without importing snnet first
_REMOTE_MODULE = ('"""Loads an snnet route exported by snnet.families.lm_hf.export_route (needs snnet installed)."""\n'
                  "from snnet.families.lm_hf import SnnetRouteConfig, SnnetRouteForCausalLM  # noqa: F401\n")


# =================================================================================== export


def _route_model(net: StitchedLM, stitch: Stitch) -> SnnetRouteForCausalLM:
    """A standalone copy of a stitch's modules (and nothing else) as :class:`SnnetRouteForCausalLM`.

    One deep copy of a route over the network's own modules (LoRA adapters merged): the copy keeps what the network
    shares (an anchor's context, used by its stem and every block of it, and its rotary module).
    """
    import copy

    from .lm_lora import merged_copy

    used = list(dict.fromkeys(stitch.anchors))  # each anchor once, in the order the route enters it
    layers = [net.stitch_layers[k].merged() for k in stitch.layers]  # a low-rank layer ships merged
    # LoRA adapters on the anchors ship merged too: the route rebuilt from its config has plain layers
    route = merged_copy(LMRoute({k: net.anchors[k] for k in used}, stitch, layers, net.vocab_size))
    if route.stem.embed.weight is route.head.lm_head.weight:
        # a round trip through an anchor with a tied head: written as two tensors (safetensors keeps no
        # shared ones); the model rebuilt from the config ties them again, both loads give the same values
        route.head.lm_head.weight = nn.Parameter(route.head.lm_head.weight.detach().clone())
    config = SnnetRouteConfig(
        route=stitch.name, anchors=[net.anchors[k].config.to_dict() for k in used], labels=[net.labels[k] for k in used],
        segments=[[used.index(s.anchor), s.start, s.stop] for s in stitch.segments],
        stitching_layers=[[layer.src_spec.channels, layer.dst_spec.channels] for layer in layers],
        vocab_size=net.vocab_size, tie_word_embeddings=False, auto_map={"AutoConfig": f"{REMOTE_CODE[:-3]}.SnnetRouteConfig",
                                             "AutoModelForCausalLM": f"{REMOTE_CODE[:-3]}.SnnetRouteForCausalLM"},
        **_token_config(net.anchors[used[0]].config))
    return SnnetRouteForCausalLM(config, route).eval()


def export_route(net: StitchedLM, stitch: int | str | Stitch, out: str | os.PathLike, *, check_tokens: int = 16) -> Path:
    """Write one network of the space as a standalone transformers model folder (see the module doc).

    The folder is written beside ``out`` under a temporary name, read back with
    ``AutoModelForCausalLM.from_pretrained`` and compared with the route on ``check_tokens``
    random token ids (logits over the shared vocabulary within 1e-5), then renamed into place.
    The tokenizer is saved with it when the network has one.
    """
    s = net.space[stitch]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder: export into a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    if any(p.device.type == "meta" for p in net.parameters()):
        raise ExportError("this network holds no weights (built on the meta device): build it with weights to export")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        if s.is_anchor:
            from .lm_lora import has_lora, merged_copy

            model = net.anchors[s.src].model
            # LoRA adapters on the anchor merged into a copy: the plain model class has no place for them
            (merged_copy(model) if has_lora(model) else model).save_pretrained(str(tmp))
        else:
            _route_model(net, s).save_pretrained(str(tmp))
            (tmp / REMOTE_CODE).write_text(_REMOTE_MODULE)
        if net.tokenizer is not None:
            net.tokenizer.save_pretrained(str(tmp))
        (tmp / "snnet_route.json").write_text(json.dumps({"route": s.name, "id": s.id, "vocab_size": net.vocab_size,
                                                          "anchors": [net.labels[k] for k in dict.fromkeys(s.anchors)]},
                                                         indent=2) + "\n")
        verify_export(net, s, tmp, check_tokens)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@torch.no_grad()
def verify_export(net: StitchedLM, stitch: Stitch, folder: str | os.PathLike, tokens: int = 16) -> float:
    """Load ``folder`` with ``AutoModelForCausalLM`` and compare its logits with the route's;
    raise :class:`ExportError` beyond :data:`TOLERANCE`. Returns the largest difference."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ExportError(f"the exported {stitch.name!r} does not load back through AutoModelForCausalLM ({e})") from e
    device = next(net.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, net.vocab_size, (2, tokens), generator=gen).to(device)
    previous = net.active
    was_training = net.training
    net.eval()
    try:
        net.select(stitch)
        want = net(ids).float()
    finally:
        net.select(previous)
        net.train(was_training)
    got = model.to(device)(input_ids=ids).logits[..., : net.vocab_size].float()
    err = float((got - want).abs().max())
    if not err <= TOLERANCE:
        raise ExportError(f"the exported {stitch.name!r} differs from the route by {err:.3g} (> {TOLERANCE}): not written")
    return err
