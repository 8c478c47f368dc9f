# PYTHON_ARGCOMPLETE_OK (argcomplete's global completion looks for this marker)
"""`python -m sleepd.client.ctl`: sleepctl."""

import sys

from . import main

sys.exit(main())
