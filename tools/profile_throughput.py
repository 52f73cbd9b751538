#!/usr/bin/env python
"""Thin wrapper around `desmoe-profile` (megatron_desmoe.profiling.cli) for use without the
console script, e.g. `torchrun --nproc-per-node 8 tools/profile_throughput.py --ep 8 ...`.
See `python tools/profile_throughput.py --help` and docs/performance.md."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_desmoe.profiling.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
