"""``python -m beit`` is the ``beit`` command."""

import sys

from .cli import main

sys.exit(main())
