"""``python -m gptkit``: the command line."""

from gptkit.cli import main

raise SystemExit(main())
