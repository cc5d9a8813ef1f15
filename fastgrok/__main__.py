"""`python -m fastgrok` = the `fastgrok` command."""
import sys

from .cli import main

sys.exit(main())
