"""``python -m morphserve`` = the ``morphserve`` command."""

import sys

from morphserve.cli import main

sys.exit(main())
