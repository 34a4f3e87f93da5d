"""The ``snnet`` command line: a table of plain typed functions, one per verb.

Every command validates its input before doing any work; an error a user can cause
(:class:`~snnet.errors.SnnetError`) is printed as one clear message and exits with status 2,
never as a traceback.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .commands.options import DEFAULT_ANCHORS, AnchorsOpt, ImgSizeOpt, split_names
from .errors import SnnetError, SnnetWarning

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Stitchable Neural Networks: one network, many accuracy/cost budgets.",
)

@app.callback()
def _root() -> None:
    """Stitchable Neural Networks: one network, many accuracy/cost budgets."""



@app.command()
def stitches(
    anchors: AnchorsOpt = DEFAULT_ANCHORS,
    img_size: ImgSizeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table (with --select klas: an object with the routes and every candidate's score).")] = False,
    kernel_size: Annotated[int, typer.Option(help="Sliding-window size of paired stitching.")] = 2,
    stride: Annotated[int, typer.Option(help="Sliding-window stride of paired stitching.")] = 1,
    all_pairs: Annotated[bool, typer.Option("--all-pairs", help="Stitch every pair of anchors, not only nearest neighbours in cost.")] = False,
    two_way: Annotated[bool, typer.Option("--two-way", help="SN-Netv2's space: small->large, large->small and the round trips S->L->S, L->S->L.")] = False,
    chains: Annotated[bool, typer.Option("--chains", help="Add routes through three anchors (Ti->S->B), as the SN-Net reference.")] = False,
    cut: Annotated[str, typer.Option("--cut", help="Where stitches cut the anchors: 'block' (the paper) or 'sublayer' (ViTs: also between each block's attention and MLP; route indices count sublayers).")] = "block",
    select: Annotated[Optional[str], typer.Option("--select", help="'klas': score every candidate stitch by KL divergence between the anchors' representations and keep --keep of them (needs weights and calibration images).")] = None,
    keep: Annotated[int, typer.Option("--keep", help="How many stitches KLAS keeps (besides the anchors).")] = 20,
    calib_images: Annotated[int, typer.Option("--calib-images", help="Calibration images KLAS scores on, drawn with --seed, spread over the classes.")] = 256,
    data: Annotated[str, typer.Option("--data", help="KLAS's calibration data: 'fashion-mnist', an ImageFolder directory, or a timm dataset name.")] = "fashion-mnist",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Where the calibration dataset lives.")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="KLAS: download timm weights (default: only snnet's shipped fmnist family loads its weights).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="KLAS: comma-separated local weight files, one per anchor.")] = None,
    seed: Annotated[int, typer.Option(help="KLAS: seed of the calibration images' choice and order.")] = 0,
    context: Annotated[Optional[int], typer.Option("--context", min=1, help="Language models: the context length (tokens) at which FLOPs per generated token are counted (default 1024, or the anchors' positions if fewer: 256 for stdlib-lm; more than they know is refused).")] = None,
) -> None:
    """List the stitch space with params and FLOPs of every stitch (random init, no weights needed).

    With --select klas, score every candidate stitch on calibration images and list the kept ones
    (pass the printed routes to `snnet train --routes`). Language models (--anchors pythia,
    qwen2.5, gpt2, smollm2, llama3.2 or their members) are priced per generated token.
    """
    from .families.lm_catalog import expand_lm
    from .model import create_snnet
    from .report import human, table

    space = dict(kernel_size=kernel_size, stride=stride, nearest=not all_pairs, two_way=two_way, chains=chains, cut=cut)
    result = None
    lm_names = expand_lm(anchors)
    if lm_names is not None:
        from .commands.lm import lm_space

        net = lm_space(lm_names, img_size, select, context, space)
    elif context is not None:
        raise SnnetError("--context is for language models; image models are priced at --img-size")
    elif select is not None:
        names = split_names(anchors)
        if select != "klas":
            raise SnnetError(f"unknown --select {select!r}: the one selection method is 'klas'")
        # KLAS scores every binary stitch of every ordered pair of anchors itself: the options of SN-Net's
        # rule-based space have no effect on it, so giving one is refused, not ignored
        shaped = [flag for flag, given, default in (("--kernel-size", kernel_size, 2), ("--stride", stride, 1),
                                                    ("--all-pairs", all_pairs, False), ("--two-way", two_way, False),
                                                    ("--chains", chains, False)) if given != default]
        if shaped:
            raise SnnetError(f"{', '.join(shaped)} shape{'s' * (len(shaped) == 1)} SN-Net's rule-based space; --select "
                             "klas scores every binary stitch of every ordered pair of anchors (both directions) and "
                             f"keeps --keep of them: drop {'it' if len(shaped) == 1 else 'them'}")
        net, result = _klas(names, img_size, keep, calib_images, data, data_dir, pretrained, weights, seed, cut)
    else:
        # the meta device builds the anchors without allocating or initialising weights
        net = create_snnet(split_names(anchors), img_size=img_size, device="meta", **space)
    from .reference import net_reference_ids

    costs = net.costs()
    ref = net_reference_ids(net)  # the SN-Net authors' id of every network their code lists (Swin's differ)
    kl = {s.name: s.kl for s in result.scores} if result is not None else None
    rows = [replace(c, extra={"ref_id": ref.get(c.id), **({"kl": kl.get(c.name)} if kl is not None else {})}).to_dict()
            for c in costs]  # the space's rows, as JSON and as the table
    if as_json:
        out: Any = rows if result is None else {"routes": list(result.routes), "stitches": rows, **result.to_dict()}
        typer.echo(json.dumps(out, indent=2))
        return
    where = (f"per generated token at a {net.context}-token context" if lm_names is not None
             else "at " + "x".join(str(s) for s in net.input_size[1:]))
    columns = [("id", "id")] + [("ref_id", "ref id")] * bool(ref)
    columns += [("name", "stitch"), ("params", "params"), ("flops", "FLOPs"), ("is_anchor", "anchor")]
    formats: dict[str, Any] = {"params": human, "flops": human}
    if result is not None:
        columns.append(("kl", "KL"))
        formats["kl"] = lambda v: "" if v is None else f"{v:.4f}"
    typer.echo(table(rows, columns, formats))
    flops = [c.flops for c in costs]
    typer.echo(f"\n{len(costs)} networks ({len(net.anchors)} anchors, {len(costs) - len(net.anchors)} stitches, "
               f"{len(net.stitch_layers)} stitching layers), {human(min(flops))}–{human(max(flops))} FLOPs {where}")
    if ref:
        typer.echo(f"ref id: the SN-Net authors' code's id of the same network ({len(ref)} of {len(costs)}; "
                   f"{sum(s != r for s, r in ref.items())} differ from snnet's)")
    if result is not None:
        typer.echo(f"KLAS scored {len(result.scores)} candidate stitches on {result.images} images and kept "
                   f"{len(result.routes)} (lowest KL per FLOPs interval); --json lists every candidate's score. "
                   f"Train this space with `snnet train --routes FILE{' --space.cut ' + cut if cut != 'block' else ''}` "
                   "(FILE: this command's --json output, which records the cut).")


def _klas(names: list[str], img_size: int | None, keep: int, calib_images: int, data: str, data_dir: Path | None,
          pretrained: bool | None, weights: str | None, seed: int, cut: str = "block") -> Any:
    """The anchors with weights, KLAS's scores on calibration images, and the network of the kept stitches."""
    from .model import anchor_specs as _specs
    from .data import build_dataset, make_loader
    from .klas import klas, klas_net
    from .model import create_snnet
    from .anchors import check_weights_file

    if calib_images < 3:  # with two, each image's one neighbour is certain: every candidate would score 0
        raise SnnetError(f"--calib-images must be >= 3 (KLAS compares each image with the others), got {calib_images}")
    files = [w.strip() for w in weights.split(",")] if weights else None
    if files is not None and len(files) != len(names):
        raise SnnetError(f"--weights gives {len(files)} files for {len(names)} anchors; give one per anchor")
    for name, file in zip(names, files or []):
        check_weights_file(file, f"weights for {name!r}")  # every file before the first anchor is built
    net = create_snnet(_specs(names, pretrained, files), img_size=img_size, cut=cut)
    calib = build_dataset(data, "train", net.anchors[0].data_config, limit=calib_images, root=data_dir, seed=seed,
                          limit_seed=seed)  # not a folder's first images: its first class
    result = klas(net, make_loader(calib, min(64, calib_images), shuffle=True, seed=seed), keep, max_images=calib_images)
    return klas_net(net, result.routes), result


# ---- commands defined in snnet/commands/*.py are registered here, one line each ----
# (keep this block: each area adds `app.command("name")(module.function)` below)
from .commands import evaluate as _evaluate_cmd  # noqa: E402
app.command("eval")(_evaluate_cmd.evaluate)
from .commands import train as _train_cmd  # noqa: E402
# train and demo parse their own options (generated from snnet.config): typer hands them every word
_GENERATED = dict(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
                  add_help_option=False)
app.command("train", **_GENERATED)(_train_cmd.train)
from .commands import deploy as _deploy_cmd  # noqa: E402
app.command("profile")(_deploy_cmd.profile)
app.command("select")(_deploy_cmd.select)
app.command("export")(_deploy_cmd.export)
from .commands import demo as _demo_cmd  # noqa: E402
app.command("demo", **_GENERATED)(_demo_cmd.demo)
from .commands import serve as _serve_cmd  # noqa: E402
app.command("serve")(_serve_cmd.serve)
from .commands import convert as _convert_cmd  # noqa: E402
app.command("convert")(_convert_cmd.convert)
from .commands import lm as _lm_cmd  # noqa: E402
app.command("generate")(_lm_cmd.generate)
# ---- end of registered commands ----


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and exit status 2.

    Bad option values that click itself catches (a word for a number, a value out of its range,
    an unknown option) are printed the same way, in one line, instead of click's boxed usage.
    """
    try:  # typer >= 0.22 carries its own copy of click; older ones use click itself
        from typer._click import exceptions as click_errors
    except ImportError:
        from click import exceptions as click_errors

    try:
        with warnings.catch_warnings():  # snnet's warnings as one line each, restored on return
            warnings.showwarning = _show_warning
            code = app(args=argv, prog_name="snnet", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # bare `snnet`: the help, as before
        e.show()
        sys.exit(2)
    except click_errors.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "snnet"
        _fail(f"{e.format_message()} (`{where} --help` lists the options)", e.exit_code)
    except typer.Abort:  # Ctrl-C outside training (click turns KeyboardInterrupt into Abort)
        _fail("interrupted", 130)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except (SnnetError, FileNotFoundError, PermissionError) as e:
        _fail(str(e), 2)
    except OSError as e:  # a full disk, a folder gone: what the system said, in one line
        _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 2)
    if isinstance(code, int) and code != 0:  # typer.Exit(code) and Ctrl-C (130) end here
        if code == 130:  # typer turns a Ctrl-C inside a command (while it imports torch, say) into exit code 130
            _fail("interrupted", 130)
        sys.exit(code)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """``warning: ...`` in one line for snnet's own warnings; Python's format for the others."""
    if issubclass(category, SnnetWarning):
        typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


def _fail(message: str, code: int) -> None:
    # one line whatever the message holds (an error of another library quoted in it may span several)
    typer.secho(f"error: {' '.join(message.split())}", err=True, fg=typer.colors.RED)
    sys.exit(code)


if __name__ == "__main__":
    main()
