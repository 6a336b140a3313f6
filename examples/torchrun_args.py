"""The examples' argument parser for torchrun: one error line from one process.

torchrun starts several processes, and each would print an argparse error (and the usage)
before the launcher's own report. With :class:`Parser` rank 0 prints the message and fails
(status 2); the other ranks leave quietly (status 0, so that the launcher waits for rank 0
instead of stopping it before it prints).
"""

from __future__ import annotations

import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line from rank 0 (``RANK``)."""

    def error(self, message: str):
        if os.environ.get("RANK", "0") != "0":
            sys.exit(0)
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)
