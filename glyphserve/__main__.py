"""``python -m glyphserve ...``: the same commands as ``glyphserve ...``."""

import sys

from glyphserve.cli import main

sys.exit(main())
