"""`python -m cht_rapidpro` is the `cht-rapidpro` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
