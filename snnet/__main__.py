"""``python -m snnet`` (and ``torchrun -m snnet train``) run the command line."""

from .cli import main

main()
