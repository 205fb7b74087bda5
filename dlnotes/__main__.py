"""``python -m dlnotes``: the command line of :mod:`dlnotes.cli`."""

import sys

from dlnotes.cli import main

if __name__ == "__main__":
    sys.exit(main())
