"""``python -m cli``: the same as the ``sllm`` command."""

from cli.main import main

main()
