"""``python -m vbdropout`` runs the ``vbd`` command line."""

from .cli import main

raise SystemExit(main())
