"""Text generation from a stitched language model, with the options users expect.

:func:`generate` runs transformers' own ``generate()`` on the network presented as a
``PreTrainedModel`` (:func:`snnet.families.lm_hf.as_transformers`): the prompt
is prefilled and each new token decoded with the route's KV cache (one slot per layer of each
anchor on the route). :class:`GenerationOptions` are the knobs: ``max_new_tokens``,
``temperature`` (0 = greedy), ``top_p``, stop strings and a seed. ``stitch=`` runs one request on
another network of the space and leaves the active stitch as it was: the stitch can change
from one request to the next.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import ConfigError, SnnetError

__all__ = ["Generated", "GenerationOptions", "generate"]


@dataclass(frozen=True)
class GenerationOptions:
    """How to continue a prompt. ``temperature=0`` decodes greedily (and ignores ``top_p``/``seed``)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop once the continuation contains one of these strings
    seed: int | None = None
    """Sampling seed: the same seed repeats a sample and leaves the caller's global RNG state untouched. Without
    one, sampling draws from torch's global RNG and advances it, as transformers' ``generate`` does: every call
    gives a new sample, and ``torch.manual_seed`` (or transformers' ``set_seed``) before a call repeats it."""

    def __post_init__(self) -> None:
        # one string is one stop string (as OpenAI's "stop" takes it), not a tuple of its characters; None is none (as
        # OpenAI's null)
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):  # else "'int' object is not iterable" (a set would lose its order)
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        # a bool is an int to Python: temperature=True sampled at 1.0 and top_p=True kept every token, silently
        if isinstance(self.temperature, bool) or not (isinstance(self.temperature, (int, float))
                                                      and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2 ** 63 <= self.seed < 2 ** 64):  # what torch.manual_seed takes
            raise ConfigError(f"seed must be a whole number from -2**63 to 2**64 - 1, got {self.seed!r}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class Generated:
    """One continuation: its text and tokens, the network that wrote it, and why it stopped."""

    text: str
    tokens: tuple[int, ...]
    stitch: str
    prompt_tokens: int
    finish: str  # "stop" (a stop string or the end-of-text token) or "length" (max_new_tokens)
    seconds: float


# transformers generate() arguments GenerationOptions sets (-> its field), and those generate() makes itself
_OPTIONS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "do_sample": "temperature", "top_p": "top_p",
            "seed": "seed", "stop": "stop"}
_MADE_HERE = {"input_ids", "attention_mask", "pad_token_id"}


def generate(net: Any, prompt: str | Sequence[str], *, tokenizer: Any = None, options: GenerationOptions | None = None,
             stitch: Any = None, **generate_kwargs: Any) -> Generated | list[Generated]:
    """Continue ``prompt`` (one string, or a list: batched, left-padded) with the active stitch
    of ``net`` (or ``stitch`` for this call only). ``tokenizer`` defaults to the network's own.

    Other keyword arguments go to transformers' ``generate()`` as they are (``streamer``,
    ``stopping_criteria``, ``min_new_tokens`` ...): the server streams tokens as they come, stops a
    generation whose client has gone, and times each stitch (:mod:`snnet.deploy.serve.lm_engine`)
    through the very call a user makes."""
    owned = sorted(set(generate_kwargs) & (_OPTIONS.keys() | _MADE_HERE))
    if owned:  # else a TypeError from deep inside, or (temperature=) an option silently replaced by options'
        k = owned[0]
        raise ConfigError(f"{k}= is a GenerationOptions setting here: pass options=GenerationOptions({_OPTIONS[k]}=...)"
                          if k in _OPTIONS else f"{k}= is made by snnet's generate from the prompt and the tokenizer: "
                          "pass the prompt as text (and tokenizer=)")
    if generate_kwargs.get("return_dict_in_generate"):  # else "tuple indices must be integers" from reading its rows
        raise ConfigError("return_dict_in_generate=True is not supported here (this generate returns Generated): for "
                          "transformers' own output (scores, ...) call snnet.lm.as_transformers(net).generate(...)")
    n = generate_kwargs.get("num_return_sequences")
    if n not in (None, 1):  # transformers returns n rows a prompt: they were paired with the prompts in order, mislabelled
        raise ConfigError(f"num_return_sequences={n!r} is not supported here (one continuation a prompt): pass the prompt "
                          "that many times in a list, with sampling (temperature > 0)")
    options = options or GenerationOptions()
    tok = tokenizer if tokenizer is not None else getattr(net, "tokenizer", None)
    if tok is None:
        raise SnnetError("generating text needs the family's tokenizer: pass tokenizer=... (or build the network "
                         "with load_tokenizers=True)")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise SnnetError("prompt must be a string or a non-empty list of strings")
    previous = net.active
    if stitch is not None:
        net.select(stitch)
    try:
        return _run(net, tok, prompts, options, single=isinstance(prompt, str),
                    extra=generate_kwargs)
    finally:
        net.select(previous)


class _StopStrings:
    """A stopping criterion: true for a row once the text of its new tokens (after the prompt's ``start``
    tokens) holds a stop string. Only the last tokens that can hold the longest stop string are decoded
    (a token decodes to at least a byte, a character to at most 4)."""

    def __init__(self, tok: Any, stops: Sequence[str], start: int) -> None:
        self.tok, self.stops, self.start = tok, tuple(stops), start
        self.window = 4 * max(len(s) for s in self.stops) + 4

    def _hit(self, tokens: Sequence[int]) -> bool:
        return any(s in self.tok.decode(tokens, skip_special_tokens=True) for s in self.stops)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        rows = input_ids[:, max(self.start, input_ids.shape[1] - self.window):].tolist()
        return torch.tensor([self._hit(r) for r in rows], dtype=torch.bool, device=input_ids.device)

    def end(self, row: Sequence[int]) -> int | None:
        """How many of the new tokens ``row`` a generation had when this criterion stopped it (None: it did
        not). In a batch, generation pads a stopped row to the longest one; those pads were never generated."""
        return next((k for k in range(1, len(row) + 1) if self._hit(row[max(0, k - self.window):k])), None)


@torch.no_grad()
def _run(net: Any, tok: Any, prompts: list[str], options: GenerationOptions, single: bool,
         extra: dict[str, Any]) -> Generated | list[Generated]:
    from .families.lm_hf import as_transformers

    model = as_transformers(net)
    device = next(net.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None and len(prompts) > 1:
        raise SnnetError("batching prompts needs a pad or end-of-text token, and this tokenizer has neither")
    rows = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if not all(rows):
        raise SnnetError("a prompt is empty after tokenisation: give at least one token of text")
    vocab, top = getattr(net, "vocab_size", None), max(max(r) for r in rows)
    if isinstance(vocab, int) and top >= vocab:  # else an IndexError from inside the embedding
        raise SnnetError(f"the tokenizer gives token id {top}, outside the network's {vocab}-token vocabulary: use the "
                         "tokenizer the family shares (the network's own: leave tokenizer= out)")
    width = max(len(r) for r in rows)  # left padding: a decoder continues the last real token of every row
    from .families.causal_lm import net_positions

    known = net_positions(net)
    if known and width + options.max_new_tokens - 1 > known[0]:  # the last new token is never read
        limit, who = known
        raise SnnetError(f"the prompt has {width} tokens and max_new_tokens asks for {options.max_new_tokens}: the model would "
                         f"read more than the {limit} positions {who} knows; shorten the prompt or lower max_new_tokens "
                         f"(to {max(limit + 1 - width, 0)})")
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    kwargs: dict[str, Any] = dict(max_new_tokens=options.max_new_tokens, do_sample=options.sampling, pad_token_id=pad, **extra)
    if options.sampling:
        kwargs.update(temperature=float(options.temperature), top_p=float(options.top_p))
        # no top-k cut unless the caller asks for one: transformers fills an unset top_k with 50, which would
        # sample from the 50 likeliest tokens whatever top_p says (top_k=0 turns its warper off; None means unset)
        kwargs.setdefault("top_k", 0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    stops = _StopStrings(tok, options.stop, int(ids.shape[1])) if options.stop else None
    if stops is not None:  # the continuation's text alone is searched (transformers' stop_strings reach into the prompt)
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([*(extra.get("stopping_criteria") or ()), stops])
    was_training = net.training
    net.eval()
    t0 = time.perf_counter()
    try:
        if options.seed is None:  # the global RNG, advanced: a new sample per call (forking it repeated one)
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        else:
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
                torch.manual_seed(options.seed)
                out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    finally:
        net.train(was_training)
    seconds = time.perf_counter() - t0
    results = []
    # generation stops at the model's end-of-text ids (its config's, one or a list: Llama 3.2 Instruct's are three),
    # which need not be the tokenizer's alone
    stop_ids = model.generation_config.eos_token_id
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    eos |= set(stop_ids if isinstance(stop_ids, (list, tuple)) else [] if stop_ids is None else [stop_ids])
    for prompt_row, row in zip(rows, out[:, ids.shape[1]:].tolist()):
        if eos & set(row):  # generation pads a finished row after its end-of-text token
            row = row[: next(k for k, t in enumerate(row) if t in eos) + 1]
        end = stops.end(row) if stops is not None and stops._hit(row) else None  # one decode for a row without a stop
        if end is not None:  # ... and after the token that completed a stop string
            row = row[:end]
        full = tok.decode(row, skip_special_tokens=True)
        hit = min((full.index(s) for s in options.stop if s in full), default=None)
        text = full if hit is None else full[:hit]
        finish = "stop" if hit is not None or eos & set(row[-1:]) else "length"
        results.append(Generated(text, tuple(row), net.active.name, len(prompt_row), finish, seconds))
    return results[0] if single else results
