"""``snnet profile``, ``snnet select`` and ``snnet export``: choose a stitch for this device and ship it alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

ModelOpt = Annotated[Optional[Path], typer.Option(
    "--model", "-m", help="A saved stitched network (folder with config.json and model.safetensors). "
                          "Default: the shipped Fashion-MNIST family.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
# forwards per stitch a profile may time (or warm up with): more is a typo, not a measurement
MAX_RUNS = 1_000_000


def _load(model: Path | None, trained: bool) -> Any:
    """The network of ``--model``, or the shipped family: its trained anchors with stitching layers
    fitted by least squares on 100 training images when weights matter (``trained``), else at
    random init (latency, memory and FLOPs do not depend on weights)."""
    from .options import DEFAULT_ANCHORS, split_names
    from ..model import StitchedNet, create_snnet

    if model is not None:
        return StitchedNet.from_pretrained(model)
    net = create_snnet(split_names(DEFAULT_ANCHORS), pretrained=trained)
    if trained:
        from .. import data as sndata

        calib = sndata.build_dataset("fashion-mnist", "train", net.anchors[0].data_config, limit=100)
        net.init_stitching(sndata.make_loader(calib, 100, shuffle=False), max_images=100)
    return net


def profile(
    model: ModelOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward.")] = 1,
    batch_sizes: Annotated[Optional[str], typer.Option(
        "--batch-sizes", help="Also time every stitch at each of these batch sizes, e.g. 1,2,4,8,16 (stored as "
                              "latency_by_batch in results.json; `snnet serve` plans its batches with it).")] = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", min=1, help="Input resolution (default: the network's).")] = None,
    repeats: Annotated[int, typer.Option(min=1, max=MAX_RUNS, help="Timed forwards per stitch (median and p90 are reported).")] = 30,
    warmup: Annotated[int, typer.Option(min=0, max=MAX_RUNS, help="Untimed forwards per stitch first.")] = 5,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads (default: torch's).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1... (default: cuda if available).")] = None,
    stitches: Annotated[Optional[str], typer.Option(help="Comma-separated stitch ids or names (default: all).")] = None,
    out: OutOpt = Path("snnet-eval"),
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Measure every stitch's latency (median, p90) and peak memory on this device; add them to results.json.

    If --out already holds results.json from `snnet eval`, the measurements are added to it and the
    accuracy/latency frontier is drawn (pareto_latency.html/.png); otherwise a results.json with
    FLOPs, params, latency and memory (accuracy empty) is written.
    """
    from .options import split_ints, split_stitches
    from ..deploy import merge_profile, profile as run_profile, read_rows
    from ..io import check_creatable
    from ..results import RESULTS_JSON, write_results
    from ..report import human, table
    from ..train import default_device

    from ..errors import SnnetError
    from .lm import is_lm_folder

    if is_lm_folder(model):  # said as such, not as "config.json is corrupt" of a sound folder
        raise SnnetError(f"--model {model} is a stitched language model: snnet profile times image networks (`snnet serve "
                         "--model` times a language model's networks on this device when it starts)")
    sizes = split_ints(batch_sizes, "--batch-sizes") if batch_sizes else None
    keys = split_stitches(stitches)
    out = check_creatable(out)  # made when the results are written: a command refused below leaves no empty folder
    dev = default_device(device)
    existing = read_rows(out / RESULTS_JSON) if (out / RESULTS_JSON).is_file() else None  # a broken file fails now
    net = _load(model, trained=False)
    for k in keys or []:
        net.stitch(k)  # unknown names fail before any measuring
    size = (net.input_size[0], img_size, img_size) if img_size else None
    from ..deploy.profiling import check_base

    # results the measurements cannot be added to (a subset's evaluation, another network's) fail before any measuring
    check_base(existing, [net.stitch(k) for k in keys] if keys else net.space)
    if existing is not None and size is not None:
        from ..deploy.memory import check_input

        check_input(net, [1], size, keys)  # a size it cannot take is said as such, not by pricing the stitches at it
        priced = {c.id: c.flops for c in net.costs(size)}
    else:
        priced = {}
    # latency measured at --img-size must not be added to rows priced at another input size (an evaluation's)
    other = next((r for r in existing or [] if not r.is_comparison and r.id in priced and r.flops != priced[r.id]), None)
    if other is not None:
        raise SnnetError(f"{out / RESULTS_JSON} prices {other.name!r} at {human(other.flops)} FLOPs, but at input "
                         f"{'x'.join(map(str, size or net.input_size))} it costs {human(priced[other.id])}: "
                         "the results were written at another input size. Profile at theirs (drop or change --img-size) "
                         "or into another --out")
    measured, settings = run_profile(net, batch_size, size, warmup, repeats, dev, threads, keys, progress, sizes)
    rows = merge_profile(existing, net.costs(size), measured)
    shown = [r.to_dict() for r in rows if r.latency_ms is not None]
    typer.echo(table(shown, [("id", "id"), ("name", "stitch"), ("params", "params"), ("flops", "FLOPs"),
                             ("latency_ms", "median ms"), ("latency_p90_ms", "p90 ms"), ("peak_mem_mb", "peak MB"),
                             ("acc1", "top-1 %")],
                     {"params": human, "flops": human, "latency_ms": lambda v: f"{v:.3f}",
                      "latency_p90_ms": lambda v: f"{v:.3f}"}))
    if sizes:
        typer.echo(table([dict(id=r.id, name=r.name, **{f"b{b.batch_size}": b.latency_ms for b in r.latency_by_batch or ()})
                          for r in measured],
                         [("id", "id"), ("name", "stitch")] + [(f"b{b}", f"batch {b} ms") for b in settings.batch_sizes],
                         {f"b{b}": (lambda v: f"{v:.3f}") for b in settings.batch_sizes}))
    typer.echo(f"\n{len(measured)} networks on {settings.device} (threads={settings.threads}), batch {batch_size}, "
               f"input {'x'.join(map(str, settings.input_size))}, {repeats} timed runs after {warmup} warm-up. "
               "Peak MB = route weights + input + peak live intermediate tensors.")
    if all(r.acc1 is not None for r in rows):
        from ..plot import plot_pareto

        results = rows
        paths = list(write_results(results, out))
        # zoo and reference rows (`snnet eval --zoo/--reference`) have no latency on this device: the plot leaves them out
        if all(r.latency_ms is not None for r in results if not r.is_comparison):
            paths += plot_pareto(results, out / "pareto_latency.html", out / "pareto_latency.png", x="latency_ms")
        else:
            typer.echo("(profile every stitch to draw the latency frontier)")
    else:
        paths = list(write_results(rows, out, csv_file=False))  # as before: a profile alone is written as JSON only
        typer.echo("(no accuracy yet: run `snnet eval --out` into the same folder, which keeps these measurements, to "
                   "draw the accuracy/latency frontier)")
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


def select(
    budget: Annotated[list[str], typer.Argument(help="Bounds such as flops<=2G, params=5M, latency=30ms, memory=200MB.")],
    model: ModelOpt = None,
    results: Annotated[Optional[Path], typer.Option(
        "--results", "-r", help="results.json (or its folder) from `snnet eval`/`snnet profile`: measured accuracy, "
                                "latency and memory. Needed for latency/memory budgets.")] = None,
) -> None:
    """Pick the most accurate stitch within a budget, and say which and why.

    Accuracy comes from --results when they hold it; otherwise the stitch with the most FLOPs within the
    budget is taken (more compute buys accuracy along the SN-Net frontier). Without --model,
    the stitches of --results are used, or else the shipped family's space. A stitched language model
    (--model DIR) is priced per generated token and ranked by bits per byte from --results.
    """
    from ..budget import parse_budget, select_stitch

    parsed = parse_budget(budget)  # bad units fail before anything is built
    if model is None and results is not None:
        chosen = select_stitch(results, parsed)
    else:
        from .options import DEFAULT_ANCHORS, split_names
        from ..model import StitchedNet, create_snnet

        from .lm import is_lm_folder, load_lm

        if is_lm_folder(model):  # a stitched language model selects by FLOPs per generated token (and bits per byte)
            net = load_lm(model, "cpu")  # type: ignore[arg-type]
        else:
            net = StitchedNet.from_pretrained(model) if model is not None else create_snnet(split_names(DEFAULT_ANCHORS), device="meta")
        chosen = select_stitch(net, parsed, results)
    typer.echo(f"{chosen.name}\n  id {chosen.id}; why: {chosen.reason}")


_EXPORT_FORMATS, _EXPORT_BATCH = "safetensors,pt2,onnx", 2  # export's defaults (a language model's export takes neither)


def export(
    stitch: Annotated[str, typer.Option("--stitch", "-s", help="Stitch id or name (`snnet stitches` lists them).")],
    model: ModelOpt = None,
    formats: Annotated[str, typer.Option("--format", "-f", help="Comma-separated: safetensors, pt2, onnx.")] = _EXPORT_FORMATS,
    out: OutOpt = Path("snnet-export"),
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Batch of the example input used to trace and verify.")] = _EXPORT_BATCH,
) -> None:
    """Export one stitch alone: only the weights its route uses, as safetensors + config, torch.export and ONNX.

    A stitched language model's network is written as a transformers model folder instead (an anchor as its
    own model class, a stitch as SnnetRouteForCausalLM), verified the same way.

    Every file is verified (outputs equal to the stitch inside the stitched network) before it is moved
    into --out; if any format fails, nothing is written.
    """
    from ..deploy.export import _check_dir, _check_formats, _missing_dirs, _remove_empty, check_export_folder, export_stitch
    from ..deploy.memory import check_input

    from ..errors import ExportError
    from ..io import check_creatable

    from .lm import export_lm_folder, is_lm_folder

    if is_lm_folder(model):  # a language model's route: a transformers model folder (its own formats)
        changed = [flag for flag, given, default in (("--format", formats, _EXPORT_FORMATS), ("--batch-size", batch_size, _EXPORT_BATCH))
                   if given != default]
        if changed:  # refused, not ignored
            raise ExportError(f"{' and '.join(changed)} {'is' if len(changed) == 1 else 'are'} for image networks: a language "
                              "model's stitch is written as a transformers model folder (safetensors and config.json), "
                              "verified on a few tokens; drop them")
        check_creatable(out, error=ExportError)
        export_lm_folder(model, stitch, out)  # type: ignore[arg-type]
        return
    chosen_formats = _check_formats(formats)
    check_creatable(out, error=ExportError)  # an unwritable --out fails before any network is built
    check_export_folder(out, chosen_formats)  # and one whose files the export would mix or overwrite
    # a bad stitch name fails before anything is loaded or written (the space needs no weights)
    if model is not None:
        from ..model import StitchedNet

        net = StitchedNet.from_pretrained(model)
        net.stitch(stitch)
    else:
        from .options import DEFAULT_ANCHORS, split_names
        from ..model import create_snnet

        net = create_snnet(split_names(DEFAULT_ANCHORS), device="meta")
        net.stitch(stitch)
    check_input(net, [batch_size], stitches=[stitch], what="the network")  # a --batch-size too big for memory
    made = _missing_dirs(out)  # a failure leaves no empty --out behind
    out = _check_dir(out)
    try:
        if model is None:
            net = _load(None, trained=True)
        paths = export_stitch(net, stitch, out, chosen_formats, batch_size)
    except BaseException:
        _remove_empty(made)
        raise
    for name, p in paths.items():
        typer.echo(f"{p}  {p.stat().st_size / 1024:.1f} KiB")
    typer.echo(f"exported {net.stitch(stitch).name} (verified: outputs match the stitched network's)")
