"""``snnet eval``: accuracy and cost of every network of a stitched family, and its Pareto frontier."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import SnnetError
from .options import ZooFamilyOpt, ZooFlopsOpt, ZooImgSizeOpt, ZooOpt, ZooParamsOpt


def evaluate(
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="A saved stitched network (folder with config.json "
                                                  "and model.safetensors). Default: the shipped Fashion-MNIST family, "
                                                  "stitching layers fitted by least squares.")] = None,
    data: Annotated[str, typer.Option(help="'fashion-mnist', an ImageFolder folder, or a timm dataset name; for a "
                                      "language model a text corpus: 'stdlib' or a folder (default: its run's "
                                      "data.corpus).")] = "fashion-mnist",
    split: Annotated[str, typer.Option(help="Split to evaluate on (a language model's 'test' is its corpus's "
                                       "held-out files).")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images (or token blocks) per batch.")] = 256,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate on N images only: of an image folder or timm "
                                                 "dataset, N drawn with a fixed seed, spread over the classes (the "
                                                 "same N every time); Fashion-MNIST's (shuffled): the first N; a language "
                                                 "model's: N token blocks, the first blocks of its files, an even "
                                                 "share of each, read in an order drawn with that seed, spread over "
                                                 "the corpus.")] = None,
    block_size: Annotated[Optional[int], typer.Option("--block-size", min=1, help="Language models: tokens predicted "
                                                      "per block (default: its run's data.block_size).")] = None,
    stitches: Annotated[Optional[str], typer.Option(help="Comma-separated stitch ids or names (default: all).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for results.json, results.csv, pareto.html, pareto.png.")]
    = Path("snnet-eval"),
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1... (default: cuda if available).")] = None,
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")] = False,
    workers: Annotated[int, typer.Option(min=0, help="Data loader worker processes.")] = 0,
    calib_images: Annotated[int, typer.Option("--calib-images", min=1, help="Training images for the least-squares "
                                              "fit of the stitching layers (only without --model), drawn with a "
                                              "fixed seed, spread over the classes.")] = 100,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")] = True,
    skip_bad_images: Annotated[bool, typer.Option(
        "--skip-bad-images", help="An image folder: decode every image first and leave out those that cannot be read "
                                  "(counted and reported) instead of stopping at the first one.")] = False,
    results: Annotated[Optional[str], typer.Option(
        "--results", "-r", help="Plot an existing results.json/.csv (or its folder) again instead of evaluating, "
                                "e.g. with --zoo; writes results and plots into --out. reference:deit (swin, resnet, "
                                "resnet18-swin_t, levit, snnetv2-deit3-s-l) plots the SN-Net authors' published "
                                "results: the paper's figure.")] = None,
    reference: Annotated[Optional[str], typer.Option(
        "--reference", help="Draw the SN-Net authors' published results beside this run: deit, swin, resnet, "
                            "resnet18-swin_t, levit or snnetv2-deit3-s-l (rows of kind 'reference' in the results, "
                            "each with the authors' id).")] = None,
    eval_protocol: Annotated[Optional[str], typer.Option(
        "--eval-protocol", help="paper: resize and centre crop as the SN-Net authors evaluate (256 -> 224 bicubic; "
                                "SN-Netv2 224 -> 224), the default for the families the paper trained; timm: the "
                                "anchors' own timm data config (crop_pct 0.9 for DeiT, Swin, LeViT). Every results "
                                "row records the transform used.")] = None,
    zoo: ZooOpt = None,
    zoo_family: ZooFamilyOpt = None,
    zoo_img_size: ZooImgSizeOpt = None,
    zoo_params: ZooParamsOpt = None,
    zoo_flops: ZooFlopsOpt = None,
) -> None:
    """Evaluate every stitch (top-1/top-5, loss, FLOPs, params), print a table, write results and Pareto plots.

    With --zoo, individually trained networks (e.g. timm's ImageNet models) are plotted beside the stitches
    and written into results.json/csv as rows of kind 'zoo' (replacing zoo rows already there); with
    --reference, the SN-Net authors' published results for a family, as rows of kind 'reference'. With
    --results, an existing results file (or reference:<family>, the authors' table) is plotted again
    without evaluating anything.
    """
    from .lm import evaluate_lm_folder, is_lm_folder, report_lm
    from .options import read_zoo_options, split_stitches
    from ..config import EVAL_PROTOCOLS
    from ..evaluate import format_results, load_results
    from ..io import check_creatable
    from ..reference import published_rows, read_published, table_name
    from ..results import mark_pareto

    # everything a user can get wrong is checked before the first forward
    out = check_creatable(out)  # made when the results are written: a command refused below leaves no empty folder
    if is_lm_folder(model):  # a stitched language model: perplexity and bits per byte on held-out text
        given = [o for o, v in (("--zoo", zoo), ("--reference", reference), ("--results", results),
                                ("--eval-protocol", eval_protocol), ("--amp", amp or None),
                                ("--zoo-family", zoo_family), ("--zoo-img-size", zoo_img_size), ("--zoo-params", zoo_params),
                                ("--zoo-flops", zoo_flops), ("--workers", workers or None),
                                ("--calib-images", None if calib_images == 100 else calib_images),
                                ("--skip-bad-images", skip_bad_images or None)) if v is not None]
        if given:
            raise SnnetError(f"{', '.join(given)}: for image networks; {model} is a stitched language model")
        paths = evaluate_lm_folder(model, data, split, batch_size, block_size, limit, split_stitches(stitches), out,
                                   device, progress)  # type: ignore[arg-type]
        typer.echo("\nwrote " + ", ".join(str(p) for p in paths))
        return
    chosen_zoo = read_zoo_options(zoo, zoo_family, zoo_img_size, zoo_params, zoo_flops, split)
    if eval_protocol not in (None, *EVAL_PROTOCOLS):
        raise SnnetError(f"--eval-protocol {eval_protocol!r}: give {' or '.join(EVAL_PROTOCOLS)}")
    if reference is not None:
        read_published(reference)  # an unknown table fails here, before any work
    if results is not None:
        given = [o for o, v in (("--model", model), ("--stitches", stitches), ("--limit", limit),
                                ("--eval-protocol", eval_protocol)) if v is not None]
        if given:
            raise SnnetError(f"--results plots results that exist; {', '.join(given)} would evaluate: drop one or the other")
        rows = published_rows(results) if table_name(results) is not None else load_results(Path(results))
        if any(r.value("task") == "causal-lm" for r in rows):  # a language model's: bits per byte, not top-1
            image_only = [o for o, v in (("--zoo", zoo), ("--reference", reference)) if v is not None]
            if image_only:
                raise SnnetError(f"{', '.join(image_only)}: for image networks; {results} holds a stitched language model's results")
            typer.echo("\nwrote " + ", ".join(str(p) for p in report_lm(rows, out)))
            return
    else:
        rows = _evaluate(model, data, split, batch_size, limit, stitches, device, amp, workers, calib_images, progress,
                         eval_protocol, skip_bad_images, out)
        rows = _keep_profile(rows, out)
    if chosen_zoo is not None:  # a new zoo replaces the one already there
        rows = mark_pareto([r for r in rows if not r.is_zoo] + chosen_zoo.rows())
    if reference is not None:  # and the authors' table the rows of the same table
        new = published_rows(reference, kind="reference")
        rows = mark_pareto([r for r in rows if not (r.kind == "reference" and r.value("source") == new[0].value("source"))]
                           + new)
    typer.echo(format_results(rows))
    if chosen_zoo is not None:
        typer.echo(chosen_zoo.describe())
    typer.echo("\nwrote " + ", ".join(str(p) for p in write_plots(rows, out)))


def write_plots(rows: list, out: Path) -> list[Path]:
    """results.json/csv and pareto.html/png into ``out``; pareto_latency.html/png too when every network of the
    results has a measured latency (`snnet profile`). Zoo models have none on this device: left out of that plot."""
    from ..plot import plot_pareto
    from ..results import network_rows, write_results

    paths = [*write_results(rows, out), *plot_pareto(rows, out / "pareto.html", out / "pareto.png")]
    network = network_rows(rows)
    if network and all(r.latency_ms is not None for r in network):
        paths += plot_pareto(rows, out / "pareto_latency.html", out / "pareto_latency.png", x="latency_ms")
    return paths


_PROFILED = ("latency_ms", "latency_p90_ms", "peak_mem_mb", "latency_by_batch")  # what `snnet profile` adds to a row


def _keep_profile(rows: list, out: Path) -> list:
    """The evaluated rows with the latency and memory that `snnet profile` measured for the same networks into
    ``out``'s results.json before (re-evaluating replaced that file, and so lost them). A file of another
    network (a stitch's name differs) or one that cannot be read is replaced as it was."""
    from dataclasses import replace

    from ..errors import ResultsError
    from ..results import RESULTS_JSON, load_results, network_rows

    path = out / RESULTS_JSON
    if not path.is_file():
        return rows
    try:
        before = {r.id: r for r in network_rows(load_results(path))}
    except ResultsError:
        return rows
    if any(r.id in before and before[r.id].name != r.name for r in rows):
        return rows
    kept = []
    for r in rows:
        old = before.get(r.id)
        measured = {f: getattr(old, f) for f in _PROFILED if getattr(old, f) is not None} if old is not None else {}
        if measured:
            settings = {"profile": old.value("profile")} if old.value("profile") is not None else {}  # type: ignore[union-attr]
            r = replace(r, **measured, extra={**r.extra, **settings})
        kept.append(r)
    return kept


def _check_subset(out: Path, chosen: list) -> None:
    """Refuse an evaluation of some stitches into a folder whose results.json holds other networks' results: the
    file is written anew with the chosen ones only, and the rest (an evaluation of every stitch, the latencies
    `snnet profile` measured) was lost. Rows do not say what data they were measured on, so they are not merged."""
    from ..errors import ResultsError
    from ..results import RESULTS_JSON, load_results, network_rows

    path = out / RESULTS_JSON
    if not path.is_file():
        return
    try:
        held = network_rows(load_results(path))
    except ResultsError:  # a file that cannot be read is replaced, as before
        return
    ids = {s.id for s in chosen}
    # rows with nothing measured (the FLOPs and params a profile of some stitches lists for every one) lose nothing
    others = [r for r in held if r.id not in ids and (r.acc1 is not None or any(getattr(r, f) is not None for f in _PROFILED))]
    if others:
        raise SnnetError(f"{path} holds the results of {len(held)} networks, {len(others)} of them not among --stitches "
                         f"(e.g. {others[0].name!r}): writing these {len(ids)} would drop them; evaluate every stitch "
                         "into it (drop --stitches), or choose another --out")


def _evaluate(model: Path | None, data: str, split: str, batch_size: int, limit: int | None, stitches: str | None,
              device: str | None, amp: bool, workers: int, calib_images: int, progress: bool,
              eval_protocol: str | None = None, skip_bad_images: bool = False, out: Path | None = None) -> list:
    """Build or load the network, check the data against it, evaluate every chosen stitch; each row records
    the evaluation protocol and the transform it ran. ``out``: where the rows will be written (checked first)."""
    from dataclasses import replace

    from .. import data as sndata
    from .options import DEFAULT_ANCHORS, SUBSET_SEED, say_skipped, split_names, split_stitches
    from ..evaluate import evaluate as run_eval
    from ..model import StitchedNet, create_snnet
    from ..reference import eval_data_config
    from ..train import default_device

    keys = split_stitches(stitches)
    dev = default_device(device)
    sndata.check_workers(workers)
    sndata.check_source(data, split)  # missing data fails before the network is built
    if model is None:
        sndata.check_source(data, "train")  # the least-squares fit reads training images
    if model is not None:
        net = StitchedNet.from_pretrained(model)
    else:
        net = create_snnet(split_names(DEFAULT_ANCHORS), pretrained=True)
    chosen = [net.stitch(k) for k in keys] if keys is not None else None
    if chosen is not None and out is not None:
        _check_subset(out, chosen)
    protocol, data_config = eval_data_config(net, data, eval_protocol)
    # --limit and the calibration images: a seeded choice, not the first N (a folder's first class)
    dataset = sndata.build_dataset(data, split, data_config, limit=limit, skip_unreadable=skip_bad_images,
                                   limit_seed=SUBSET_SEED)
    say_skipped(dataset, f"{data} ({split})")
    classes = sndata.num_classes(dataset)
    if classes != net.num_classes:
        raise SnnetError(f"{data} has {classes} classes but the network predicts {net.num_classes}: "
                         "evaluate on the data the network was trained for")
    shape = tuple(dataset[0][0].shape)
    if shape != tuple(net.input_size):
        raise SnnetError(f"{data} gives images of shape {shape}, the network takes {tuple(net.input_size)}")
    net.to(dev)
    if model is None:
        calib = sndata.build_dataset(data, "train", data_config, limit=calib_images, skip_unreadable=skip_bad_images,
                                     limit_seed=SUBSET_SEED)
        say_skipped(calib, f"{data} (train)")
        report = net.init_stitching(sndata.make_loader(calib, min(batch_size, calib_images), shuffle=False),
                                    max_images=calib_images, progress=progress)
        typer.echo(f"fitted {report.layers} stitching layers by least squares on {report.images} training images "
                   f"({report.seconds:.1f}s)", err=True)
    loader = sndata.make_loader(dataset, batch_size, shuffle=False, num_workers=workers)
    rows = run_eval(net, loader, chosen, device=dev, progress=progress, amp=amp)
    how = {"eval_transform": sndata.describe_transform(dataset)}
    return [replace(r, eval_protocol=protocol, extra={**r.extra, **how}) for r in rows]
