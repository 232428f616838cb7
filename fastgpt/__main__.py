"""``python -m fastgpt``: the same command as the ``fastgpt`` console script."""

from .cli import main

raise SystemExit(main())
