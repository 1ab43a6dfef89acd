"""`python -m core.cli`, as the `chatbus` command."""

import sys

from core.cli import main

sys.exit(main())
