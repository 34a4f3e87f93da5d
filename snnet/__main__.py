"""``python -m snnet`` (and ``torchrun -m snnet train``) run the command line."""

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line loads: one line, as everywhere else
    import sys

    sys.stderr.write("error: interrupted\n")
    raise SystemExit(130) from None

main()
