"""Perplexity and bits per byte of every network of a stitched language model, in one pass.

Evaluation shares work exactly as the vision evaluation does: :func:`snnet.evaluate.forward_stitches`
runs each first anchor's stem and blocks once per batch and every route only from where it leaves
what it shares with others. Per network it sums, over the held-out blocks of
:mod:`snnet.text`, the negative log-likelihood of every next token (over the shared tokenizer's
ids), the top-1/top-5 hits, the tokens and the UTF-8 bytes those tokens cover.

The rows are :class:`snnet.results.Row` s with the fields read as a language model's:
``acc1``/``acc5`` are next-token top-1/top-5 accuracy (%), ``loss`` the mean negative
log-likelihood per token (nats), ``images`` the number of predicted tokens, ``flops`` the
multiply-accumulates per generated token at the network's stated context; ``extra`` adds
``ppl`` (exp of the loss), ``bpb`` (total NLL in bits / total bytes), ``tokens``, ``bytes``,
``context`` and ``task: causal-lm``. ``pareto`` marks the bits-per-byte frontier against FLOPs.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch

from .errors import SnnetError
from .evaluate import _select, forward_stitches
from .tasks import Tally
from .report import human, progress as report_progress, table
from .results import Row, mark_pareto, pareto_front

__all__ = ["LM_FRONT", "evaluate_lm", "format_lm_results", "lm_validation_scores"]

LM_FRONT = "bpb"  # the metric a language model's frontier is drawn on (lower is better)


@torch.inference_mode()
def evaluate_lm(net: Any, loader: Iterable[Any], stitches: Sequence[Any] | None = None, *, progress: bool = True,
                context: int | None = None) -> list[Row]:
    """Perplexity, bits per byte and next-token accuracy of each selected network (default: all).

    ``loader`` yields ``{"input_ids": (batch, T + 1), "bytes": (batch,)}`` (:func:`snnet.text.text_loader`):
    tokens ``0..T-1`` are read, ``1..T`` predicted, ``bytes`` is the UTF-8 text the predicted tokens
    cover. FLOPs are per generated token at ``context`` (default: the network's). The network's
    mode and active stitch are left as they were.
    """
    chosen = _select(net, stitches)
    device = next(net.parameters()).device
    from .families.causal_lm import net_positions

    limit = net_positions(net)
    costs = net.costs(context)  # a context no route can run is refused before the text is read
    tallies = {s.id: Tally(device) for s in chosen}
    tokens = nbytes = 0
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    bar = report_progress(total, f"eval {len(chosen)} networks", "seq", progress)
    was_training = net.training
    net.eval()
    try:
        for batch in loader:
            if not isinstance(batch, dict) or "input_ids" not in batch or "bytes" not in batch:
                raise SnnetError("evaluate_lm needs batches of {'input_ids', 'bytes'} (snnet.text.text_loader)")
            ids = batch["input_ids"].to(device)
            if ids.ndim != 2 or ids.shape[1] < 2:
                raise SnnetError(f"input_ids must be (batch, tokens >= 2), got {tuple(ids.shape)}")
            lo, hi = int(ids.min()), int(ids.max())
            if hi >= net.vocab_size or lo < 0:
                raise SnnetError(f"token id {lo if lo < 0 else hi} is outside the network's {net.vocab_size}-token vocabulary: "
                                 "the text was tokenised with another tokenizer")
            if limit is not None and ids.shape[1] - 1 > limit[0]:
                raise SnnetError(f"blocks of {ids.shape[1] - 1} predicted tokens are longer than the {limit[0]} positions "
                                 f"{limit[1]} knows: cut the text into blocks of at most {limit[0]} tokens")
            x, y = ids[:, :-1], ids[:, 1:]
            for s, logits in forward_stitches(net, x, chosen):
                tallies[s.id].update(logits.flatten(0, 1), y.flatten())  # every position is one prediction
            tokens += y.numel()
            nbytes += int(batch["bytes"].sum())
            bar.update(len(ids))
    finally:
        net.train(was_training)
        bar.close()
    if tokens == 0:
        raise SnnetError("the loader yielded no text: nothing to evaluate")
    if nbytes == 0:
        raise SnnetError("the evaluated tokens cover no bytes of text: cannot compute bits per byte")
    ctx = int(context or net.context)
    rows = []
    for s in chosen:
        t, c = tallies[s.id], costs[s.id]
        nll = t.loss.item()  # summed over every predicted token
        loss = nll / tokens
        extra = {"tokens": tokens, "bytes": nbytes, "context": ctx, "task": "causal-lm"}
        rows.append(Row(s.id, s.name, c.flops, c.params, 100.0 * t.hits1.item() / tokens,
                        100.0 * t.hits5.item() / tokens, loss, tokens, s.is_anchor, ppl=math.exp(loss),
                        bpb=nll / math.log(2) / nbytes, extra=extra))
    return mark_pareto(rows, y=LM_FRONT)


def lm_validation_scores(net: Any, val_data: Any, batch_size: int) -> dict[str, Any]:
    """What a causal-lm training run records at an epoch's end (``evals.jsonl``): the mean over every
    network of its loss, perplexity, bits per byte and next-token top-1, and each anchor's bits per byte."""
    from .text import text_loader

    rows = evaluate_lm(net, text_loader(val_data, batch_size), progress=False)
    mean = {k: sum(r.value(k) for r in rows) / len(rows) for k in ("loss", "ppl", "bpb", "acc1")}
    return {**{f"{k}_mean": v for k, v in mean.items()}, "tokens": rows[0].images,
            "anchors": {r.name: {"bpb": r.value("bpb"), "ppl": r.value("ppl")} for r in rows if r.is_anchor}}


def format_lm_results(results: Sequence[Row]) -> str:
    """A text table sorted by FLOPs per token, the bits-per-byte frontier marked with ``*``."""
    front = pareto_front(results, y=LM_FRONT)
    rows = [dict(r.to_dict(), pareto=r.id in front) for r in sorted(results, key=lambda r: (r.flops, r.id))]
    columns = [("id", "id"), ("name", "network"), ("params", "params"), ("flops", "FLOPs/token"), ("ppl", "ppl"),
               ("bpb", "bits/byte"), ("acc1", "top-1 %"), ("is_anchor", "anchor"), ("pareto", "frontier")]
    text = table(rows, columns, {"params": human, "flops": human, "ppl": lambda v: f"{v:.3f}",
                                 "bpb": lambda v: f"{v:.4f}", "pareto": lambda v: "*" if v else ""})
    best = min(results, key=lambda r: (r.value("bpb"), r.id))
    first = results[0]
    return (f"{text}\n\n{len(results)} networks on {first.value('tokens')} tokens ({first.value('bytes')} bytes); FLOPs per "
            f"generated token at a {first.value('context')}-token context; {len(front)} on the bits-per-byte frontier "
            f"(*); best {best.value('bpb'):.4f} bits/byte ({best.name})")
