"""``python -m attnctl`` runs the command line (also under ``accelerate launch -m attnctl``)."""

import sys

from attnctl.cli import main

sys.exit(main())
