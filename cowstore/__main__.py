"""`python -m cowstore`: the command line."""

from .cli import main

raise SystemExit(main())
