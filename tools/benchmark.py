#!/usr/bin/env python
"""DES-MoE vs full fine-tuning / ESFT-Token / ESFT-Gate on N = 2..6 domains (docs/benchmark.md).

    python tools/benchmark.py --out .cache/benchmark-out            # full mode
    python tools/benchmark.py --fast --out /tmp/bench               # CI smoke mode
"""

import sys

from megatron_desmoe.benchmark.runner import main

if __name__ == "__main__":
    sys.exit(main())
