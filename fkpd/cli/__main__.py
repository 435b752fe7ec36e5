"""``python -m fkpd.cli ...``: the ``fkpd`` command (the app starts its worker this way)."""

import sys

from fkpd.cli import main

sys.exit(main())
