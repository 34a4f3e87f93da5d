"""The ``snnet`` command line: a table of plain typed functions, one per verb.

Every command validates its input before doing any work; an error a user can cause
(:class:`~snnet.errors.SnnetError`) is printed as one clear message and exits with status 2,
never as a traceback.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from .commands.options import DEFAULT_ANCHORS, AnchorsOpt, ImgSizeOpt, split_names
from .errors import SnnetError

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
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    kernel_size: Annotated[int, typer.Option(help="Sliding-window size of paired stitching.")] = 2,
    stride: Annotated[int, typer.Option(help="Sliding-window stride of paired stitching.")] = 1,
    all_pairs: Annotated[bool, typer.Option("--all-pairs", help="Stitch every pair of anchors, not only nearest neighbours in cost.")] = False,
) -> None:
    """List the stitch space with params and FLOPs of every stitch (random init, no weights needed)."""
    from .model import create_snnet
    from .report import human, table

    # the meta device builds the anchors without allocating or initialising weights
    net = create_snnet(split_names(anchors), img_size=img_size, kernel_size=kernel_size, stride=stride,
                       nearest=not all_pairs, device="meta")
    costs = net.costs()
    rows = [c.to_dict() for c in costs]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    size = "x".join(str(s) for s in net.input_size[1:])
    typer.echo(table(rows, [("id", "id"), ("name", "stitch"), ("params", "params"), ("flops", "FLOPs"), ("is_anchor", "anchor")],
                     {"params": human, "flops": human}))
    flops = [c.flops for c in costs]
    typer.echo(f"\n{len(costs)} networks ({len(net.anchors)} anchors, {len(costs) - len(net.anchors)} stitches, "
               f"{len(net.stitch_layers)} stitching layers), {human(min(flops))}–{human(max(flops))} FLOPs at {size}")


# ---- commands defined in snnet/commands/*.py are registered here, one line each ----
# (keep this block: each area adds `app.command("name")(module.function)` below)
from .commands import evaluate as _evaluate_cmd  # noqa: E402
app.command("eval")(_evaluate_cmd.evaluate)
from .commands import train as _train_cmd  # noqa: E402
app.command("train")(_train_cmd.train)
from .commands import deploy as _deploy_cmd  # noqa: E402
app.command("profile")(_deploy_cmd.profile)
app.command("select")(_deploy_cmd.select)
app.command("export")(_deploy_cmd.export)
from .commands import demo as _demo_cmd  # noqa: E402
app.command("demo")(_demo_cmd.demo)
from .commands import serve as _serve_cmd  # noqa: E402
app.command("serve")(_serve_cmd.serve)
from .commands import convert as _convert_cmd  # noqa: E402
app.command("convert")(_convert_cmd.convert)
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
        code = app(args=argv, prog_name="snnet", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # bare `snnet`: the help, as before
        e.show()
        sys.exit(2)
    except click_errors.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "snnet"
        _fail(f"{e.format_message()} (`{where} --help` lists the options)", e.exit_code)
    except typer.Abort:
        _fail("aborted", 1)
    except (SnnetError, FileNotFoundError, PermissionError) as e:
        _fail(str(e), 2)
    if isinstance(code, int) and code != 0:  # typer.Exit(code) and Ctrl-C (130) end here
        if code == 130:
            typer.secho("interrupted", err=True, fg=typer.colors.RED)
        sys.exit(code)


def _fail(message: str, code: int) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    sys.exit(code)


if __name__ == "__main__":
    main()
