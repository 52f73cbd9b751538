#!/usr/bin/env python
"""Train a SentencePiece tokenizer on domain files (same as desmoe-train-tokenizer)."""

import sys

from megatron_desmoe.data.tokenizer_cli import main

if __name__ == "__main__":
    sys.exit(main())
