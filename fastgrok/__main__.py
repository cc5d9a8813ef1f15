"""`python -m fastgrok` = the `fastgrok` command."""
import sys

from fastgrok.cli import main

sys.exit(main())
