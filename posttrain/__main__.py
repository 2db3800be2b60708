"""``python -m posttrain`` is the same as the ``posttrain`` command."""

from posttrain.cli import main

main()
