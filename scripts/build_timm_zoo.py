#!/usr/bin/env python3
"""Build snnet/data_files/timm_in1k.json: timm's ImageNet-1k models with FLOPs counted by snnet.

Inputs are two tables from the ``results/`` folder of huggingface/pytorch-image-models (timm,
Apache-2.0), kept in ``../shared/zoo/`` (see the README there): ``results-imagenet.csv``
(top-1/top-5, params, evaluation image size per pretrained tag) and
``benchmark-infer-amp-nchw-pt291-cu128-4090.csv`` (timm's GMACs per architecture and size).

For every (architecture, evaluation size) the model is built with random init on the meta device
(no memory, no weights, no download) and counted with :func:`snnet.flops.model_costs`, the counter
that prices the stitches: one multiply-accumulate is one FLOP, attention matmuls included (fused
attention switched off), fvcore's rules for normalisation and pooling. Models with training-time
branches that fold away for inference (RepVGG, MobileOne, RepViT, ...; timm's
``reparameterize_model``) are built on the CPU, folded, and counted as they run at inference; the
unfolded counts are kept as ``flops_train``/``params_train``. A model whose forward cannot run on
the meta device is retried on the CPU if it is small enough.

timm's GMACs at the same size are kept as a cross-check column. Where the two counts differ by
more than the tolerance, :func:`explain` measures why (which part of the model makes up the
difference) and the ``check`` column says so; snnet/data_files/README.md summarises the findings.

    nice -n 10 python scripts/build_timm_zoo.py --source ../shared/zoo --threads 1
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

REPOSITORY = "huggingface/pytorch-image-models"
COMMIT = "aa4b5850c1543fa488abf260f18390eda46cf85d"
RESULTS = "results-imagenet.csv"
BENCHMARK = "benchmark-infer-amp-nchw-pt291-cu128-4090.csv"
SHARED_PREFIX = "timm-"  # ../shared/zoo keeps the upstream files under this prefix
IMAGENET_VAL = 50_000  # images of the ImageNet-1k validation set, on which timm's top-1 is measured
# |snnet - timm| within this fraction, or within timm's rounding (2 decimals of GMACs), agrees
TOLERANCE = 0.03
ROUNDING = 0.005e9

# Families SN-Net compares against, by architecture name (first match wins); others take timm's
# module name, except in modules that hold several unrelated designs, where the name's first word.
FAMILY_RULES = [
    ("deit", r"^deit3?_"), ("vit", r"^vit_"), ("swin", r"^swin"), ("convnext", r"^convnext"),
    ("levit", r"^levit"), ("efficientnet", r"^(tf_)?efficientnet"), ("mobilenet", r"^(tf_)?mobilenet"),
    ("regnet", r"^regnet"),
]
MODULE_FAMILY = {"resnet": "resnet", "resnetv2": "resnet", "vision_transformer": "vit",
                 "vision_transformer_relpos": "vit", "vision_transformer_hybrid": "vit"}
MIXED_MODULES = {"efficientnet", "mobilenetv3"}
FOLDING = ("fuse", "reparameterize", "switch_to_deploy")  # what timm's reparameterize_model calls


def family(arch: str, modules: dict[str, str]) -> str:
    """``modules`` maps an architecture to its timm module (from :func:`timm_modules`)."""
    for name, pattern in FAMILY_RULES:
        if re.match(pattern, arch):
            return name
    module = modules.get(arch, "")
    if module in MIXED_MODULES:
        return re.sub(r"^tf_", "", arch).split("_")[0]
    return MODULE_FAMILY.get(module, module)


def timm_modules() -> dict[str, str]:
    import timm

    return {arch: module for module in timm.list_modules() for arch in timm.list_models(module=module)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(text: str) -> float:
    return float(text.replace(",", ""))  # timm writes 1,014.45


def build(tag: str, img_size: int, device: str) -> Any:
    import torch

    from snnet.anchors import AnchorSpec, create_anchor

    # fixed-size models (ViTs) are built at the evaluation size; CNNs take any size
    with torch.device(device):
        return create_anchor(AnchorSpec(tag, kwargs=(("img_size", img_size),))).eval()


def folds(model: Any) -> bool:
    return any(hasattr(m, a) for m in model.modules() for a in FOLDING if m is not model)


def count(tag: str, img_size: int, cpu_max_params: float) -> dict:
    """FLOPs and params of one model at one size, in its inference form (see the module docstring)."""
    from timm.utils.model import reparameterize_model

    from snnet.flops import model_costs, num_params

    size = (3, img_size, img_size)
    errors = []
    for device in ("meta", "cpu"):
        try:
            model = build(tag, img_size, device)
            if device == "cpu" and num_params(model) > cpu_max_params:
                raise RuntimeError(f"{num_params(model) / 1e6:.0f}M params is too large to count on the CPU here")
            size = (model.pretrained_cfg.get("input_size", (3,))[0], img_size, img_size)
            flops, params = model_costs(model, size)
            out = {"flops": flops, "params": params, "flops_from": f"snnet ({device})"}
            if folds(model):
                if device == "meta":  # folding computes new weights: it needs real tensors
                    model = build(tag, img_size, "cpu")
                folded = model_costs(reparameterize_model(model, inplace=True), size)
                if folded != (flops, params):
                    out.update(flops=folded[0], params=folded[1], flops_train=flops, params_train=params,
                               flops_from="snnet (cpu, re-parameterised)")
            return out
        except Exception as e:  # noqa: BLE001  (a build script: record why and go on)
            errors.append(f"{device}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
    return {"flops": None, "params": None, "flops_from": None, "error": "; ".join(errors)}


def agree(ours: float, gmacs: float) -> bool:
    return abs(ours - gmacs * 1e9) <= max(TOLERANCE * gmacs * 1e9, ROUNDING)


def leaf_macs(tag: str, img_size: int, pick: Callable[[Any], bool]) -> int:
    """MACs spent inside the model's leaf modules that ``pick`` selects (counted as the whole model is)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from snnet.flops import _fvcore_mapping, unfused_attention

    model = build(tag, img_size, "meta")
    for p in model.parameters():
        p.requires_grad_(False)
    with FlopCounterMode(display=False, custom_mapping=_fvcore_mapping()) as counter, torch.no_grad(), \
            unfused_attention(model):
        model(torch.zeros(1, 3, img_size, img_size, device="meta"))
    root = type(model).__name__  # the counter names modules by path from the root's class name
    per_module = counter.get_flop_counts()
    return sum(sum(per_module.get(f"{root}.{name}", {}).values()) // 2
               for name, m in model.named_modules() if name and not list(m.children()) and pick(m))


def explain(tag: str, img_size: int, ours: int, gmacs: float) -> str:
    """Which part of the model makes up the difference between snnet's count and timm's GMACs.

    Each candidate is a measurement: snnet's count with one kind of layer taken out (or added in
    timm's way) is compared with timm's figure; the first that agrees names the cause.
    """
    from torch import nn
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    candidates = [
        ("timm's count leaves out recurrent layers (LSTM/GRU)", lambda: ours - leaf_macs(
            tag, img_size, lambda m: isinstance(m, nn.RNNBase))),
        ("timm's count leaves out convolutions with padding='same'", lambda: ours - leaf_macs(
            tag, img_size, lambda m: isinstance(m, nn.Conv2d) and m.padding == "same")),
        ("timm's count adds weight standardisation (5 FLOPs per standardised weight per forward)",
         lambda: ours + 5 * sum(m.weight.numel() for m in build(tag, img_size, "meta").modules()
                                if isinstance(m, (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)))),
    ]
    for why, alternative in candidates:
        other = alternative()
        if other != ours and agree(other, gmacs):
            return why
    return f"{'higher' if ours > gmacs * 1e9 else 'lower'} in snnet: not explained"


NAMED = ("deit", "vit", "swin", "resnet", "convnext", "levit", "efficientnet", "mobilenet", "regnet")


def summarise(models: list[dict]) -> str:
    """The figures snnet/data_files/README.md quotes: size, families, and the cross-check with timm's GMACs."""
    fams = collections.Counter(m["family"] for m in models)
    sizes = collections.Counter(m["img_size"] for m in models)
    checked = [m for m in models if m["timm_gmacs"] and m["flops_from"].startswith("snnet")]
    rel = [abs(m["flops"] - m["timm_gmacs"] * 1e9) / (m["timm_gmacs"] * 1e9) for m in checked]
    folded = [m for m in models if "flops_train" in m]
    worst = max(folded, key=lambda m: m["flops_train"] / m["flops"], default=None)
    lines = [
        f"{len(models)} models: {len({m['arch'] for m in models})} architectures, "
        f"{len({(m['arch'], m['img_size']) for m in models})} architecture/size pairs, {len(fams)} families",
        "named families: " + ", ".join(f"{f} {fams[f]}" for f in NAMED),
        "image sizes: " + ", ".join(f"{k} ({v})" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:6]) + ", ...",
        "FLOPs from: " + ", ".join(f"{k} {v}" for k, v in collections.Counter(m["flops_from"] for m in models).items()),
        f"re-parameterised for inference: {len(folded)} models"
        + (f" (largest change: {worst['name']}, {worst['flops_train'] / 1e9:.3f} G unfolded -> {worst['flops'] / 1e9:.3f} G)"
           if worst else ""),
        f"cross-check with timm's GMACs at the same size: {len(checked)} models; {sum(r <= 0.01 for r in rel)} within 1%, "
        f"{sum(r <= TOLERANCE for r in rel)} within {TOLERANCE:.0%}, "
        f"{sum(not m['check'] and r > TOLERANCE for m, r in zip(checked, rel))} more within timm's rounding (0.005 G)",
    ]
    for k, v in collections.Counter(m["check"] or "agree" for m in models).most_common():
        names = sorted({m["arch"] for m in models if m["check"] == k})
        lines.append(f"  {v:5d}  {k}" + (f": {', '.join(names)}" if k != "agree" else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=Path("../shared/zoo"), help="folder with timm's two tables")
    ap.add_argument("--out", type=Path, default=Path("snnet/data_files/timm_in1k.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-max-params", type=float, default=150e6,
                    help="largest model built on the CPU (to fold it, or when the meta device cannot run it)")
    ap.add_argument("--only", default=None, help="a regular expression: count only the matching architectures (a quick try)")
    ap.add_argument("--summary", action="store_true", help="print the figures of the table at --out; count nothing")
    args = ap.parse_args(argv)
    if args.summary:
        print(summarise(json.loads(args.out.read_text())["models"]))
        return 0

    import timm
    import torch

    from snnet.report import progress

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    def source(name: str) -> Path:
        for p in (args.source / name, args.source / (SHARED_PREFIX + name)):
            if p.is_file():
                return p
        sys.exit(f"{name} not found in {args.source}: pass --source with timm's results tables")

    results, bench = read_csv(source(RESULTS)), read_csv(source(BENCHMARK))
    gmacs = {(r["model"], int(r["infer_img_size"])): float(r["infer_gmacs"]) for r in bench if r.get("infer_gmacs")}
    if args.only:
        results = [r for r in results if re.search(args.only, r["model"].split(".")[0])]
    sizes_of = collections.defaultdict(set)
    for r in results:
        sizes_of[r["model"]].add(int(r["img_size"]))
    pairs = sorted({(r["model"].split(".")[0], int(r["img_size"])): r["model"] for r in results}.items())
    counted: dict[tuple[str, int], dict] = {}
    start = time.time()
    bar = progress(len(pairs), "count FLOPs", "model")
    for (arch, size), tag in pairs:
        c = count(tag, size, args.cpu_max_params)
        c["tag"] = tag
        theirs = gmacs.get((arch, size))
        if c["flops"] is None:
            c["check"] = "not counted by snnet: timm's GMACs used" if theirs is not None else "no FLOPs: dropped"
        elif theirs is None:
            c["check"] = "no timm benchmark at this size"
        else:
            c["check"] = "" if agree(c["flops"], theirs) else explain(tag, size, c["flops"], theirs)
        counted[arch, size] = c
        bar.update(1)
    bar.close()
    seconds = time.time() - start

    modules = timm_modules()
    models = []
    for r in results:
        arch, size = r["model"].split(".")[0], int(r["img_size"])
        c, theirs = counted[arch, size], gmacs.get((arch, size))
        if c["flops"] is None and theirs is None:
            continue  # no FLOPs from anywhere: cannot be placed on the plot
        # a tag evaluated at several sizes appears once per size: the size makes the name unique
        name = r["model"] if len(sizes_of[r["model"]]) == 1 else f"{r['model']}@{size}"
        row = {
            "name": name, "model": r["model"], "arch": arch, "family": family(arch, modules), "img_size": size,
            "crop_pct": float(r["crop_pct"]), "acc1": float(r["top1"]), "acc5": float(r["top5"]),
            "params": c["params"] if c["params"] is not None else round(number(r["param_count"]) * 1e6),
            "flops": c["flops"] if c["flops"] is not None else round(theirs * 1e9),
            "flops_from": c["flops_from"] or "timm GMACs",
            "timm_params_m": number(r["param_count"]), "timm_gmacs": theirs, "check": c["check"],
        }
        row.update({k: c[k] for k in ("flops_train", "params_train", "error") if k in c})
        models.append(row)
    dropped = len(results) - len(models)

    meta = {
        "name": "timm-in1k",
        "description": "timm's ImageNet-1k pretrained models: top-1/top-5 from timm's published validation results, "
                       "FLOPs counted by snnet at each model's evaluation image size (batch 1).",
        "source": {"repository": REPOSITORY, "commit": COMMIT, "files": [f"results/{RESULTS}", f"results/{BENCHMARK}"],
                   "license": "Apache-2.0"},
        "license": "Apache-2.0 (derived from timm's results tables; see snnet/data_files/README.md)",
        "built_by": "scripts/build_timm_zoo.py" + (f" --only {args.only!r}" if args.only else ""),
        "timm": timm.__version__, "torch": torch.__version__.split("+")[0], "images": IMAGENET_VAL,
        "flops": "multiply-accumulates (one MAC = one FLOP, fvcore's convention as in SN-Net), attention matmuls "
                 "included, counted by snnet.flops.model_costs on a random-init model at img_size; models that "
                 "timm can re-parameterise for inference are counted folded",
        "tolerance": f"counts agree when within {TOLERANCE:.0%} of timm's GMACs or within its rounding (0.005 G)",
        "columns": {
            "name": "the pretrained tag (arch.tag), with @size when timm evaluated the tag at several sizes",
            "family": "deit, vit, swin, convnext, levit, efficientnet, mobilenet, regnet, resnet by name; else timm's module",
            "acc1": "ImageNet-1k val top-1 %", "acc5": "top-5 %", "params": "parameters as counted (inference form)",
            "flops": "MACs at img_size (inference form)",
            "flops_from": "'snnet (meta)', 'snnet (cpu)', 'snnet (cpu, re-parameterised)' or 'timm GMACs' (not counted)",
            "flops_train/params_train": "the counts before re-parameterisation, where it changes them",
            "timm_params_m": "timm's param_count (millions) in results-imagenet.csv",
            "timm_gmacs": "timm's benchmark GMACs at the same arch and size (null if not benchmarked at it)",
            "check": "empty when the two counts agree, else why they differ (measured by the script)",
        },
        "count_seconds": round(seconds, 1),
        "dropped": dropped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # one model per line: readable diffs when the table is rebuilt
    head = json.dumps(meta, indent=1)[:-2]
    body = ",\n".join("  " + json.dumps(m, separators=(", ", ": ")) for m in models)
    args.out.write_text(f"{head},\n \"models\": [\n{body}\n ]\n}}\n")
    print(f"counted {len(pairs)} architecture/size pairs in {seconds:.0f}s; dropped {dropped} rows; wrote {args.out}")
    print(summarise(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
