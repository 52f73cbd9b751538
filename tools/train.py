#!/usr/bin/env python
"""Launch multi-domain DES-MoE fine-tuning (see megatron_desmoe/training/cli.py)."""
import sys

from megatron_desmoe.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
