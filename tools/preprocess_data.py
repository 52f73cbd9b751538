#!/usr/bin/env python
"""Tokenize one dataset per domain into Megatron indexed datasets (same as desmoe-preprocess)."""

import sys

from megatron_desmoe.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
