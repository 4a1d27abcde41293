"""`python -m glm_ft SUBCOMMAND ...`: the same as the `glm-ft` command."""

import sys

from glm_ft.command import main

sys.exit(main())
