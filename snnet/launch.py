"""``python -m snnet.launch [torchrun options] train ...``: torchrun, saying what happened in one line.

torchrun's own agent answers SIGTERM or Ctrl-C with a traceback of its own (a
``SignalException``, about thirty lines), and a worker that exits with an error with a
``ChildFailedError`` report -- after snnet's workers have already said what happened (the
checkpoint and the command that resumes it, or the bad option). This launcher runs the same
torchrun (``torch.distributed.run``, its options as they are) and leaves the workers' line as
the only one::

    python -m snnet.launch --nproc_per_node 2 train --anchors deit --data imagenet/ ...

``torchrun --nproc_per_node 2 -m snnet train ...`` keeps working; only its messages differ.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

# the launcher's own command, for the resume command the workers print (snnet.commands.config_cli.resume_command)
LAUNCHER_ENV = "SNNET_LAUNCHER"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, get_args_parser, parse_min_max_nnodes, run

    argv = sys.argv[1:] if argv is None else argv
    if not any(word in ("train", "demo") for word in argv):
        return _no_command()
    # the command is where torchrun's parser puts its script: the first word that is no option's value (an option
    # can take the word as its value: --rdzv-id train)
    script = get_args_parser().parse_args(argv)
    if script.training_script not in ("train", "demo"):
        return _no_command()
    at = len(argv) - len(script.training_script_args) - 1
    options, command = argv[:at], argv[at:]
    args = get_args_parser().parse_args([*options, "--module", "snnet", *command])
    # torchrun takes any word for these and fails on a bad one with a traceback (a bare AssertionError for 0 processes)
    try:
        low, high = parse_min_max_nnodes(args.nnodes)
    except ValueError:
        low, high = 0, 0
    if not 0 < low <= high:
        sys.stderr.write(f"error: --nnodes {args.nnodes}: give a number of nodes >= 1, or MIN:MAX with 1 <= MIN <= MAX\n")
        return 2
    try:
        nproc = determine_local_world_size(args.nproc_per_node)
    except ValueError as e:
        sys.stderr.write(f"error: --nproc_per_node {args.nproc_per_node}: {str(e).splitlines()[0]} (give a number of "
                         "processes >= 1, or auto, cpu, gpu)\n")
        return 2
    if nproc < 1:
        sys.stderr.write(f"error: --nproc_per_node {args.nproc_per_node}: give a number of processes >= 1\n")
        return 2
    launcher = ["python", "-m", "snnet.launch", *options]
    os.environ[LAUNCHER_ENV] = shlex.join(launcher)  # resume_command splits it with shlex: a value with a space stays one
    for name in list(logging.root.manager.loggerDict):  # its "shutting down workers" notes (each module's own level)
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        run(args)
    except SignalException as e:  # the workers have checkpointed and printed the resume command
        return 128 + int(e.sigval)
    except ChildFailedError as e:  # a worker's own message (one line) is above
        codes = [f.exitcode for f in e.failures.values()]
        return next((c for c in codes if c and c > 0), 1)
    return 0


def _no_command() -> int:
    sys.stderr.write("error: give torchrun's options, then the snnet command: python -m snnet.launch "
                     "--nproc_per_node 2 train ...\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
