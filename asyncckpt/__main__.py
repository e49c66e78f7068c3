"""``python -m asyncckpt``: the same command line as the ``asyncckpt`` script."""

from .cli import main

main()
