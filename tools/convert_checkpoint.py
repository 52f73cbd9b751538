#!/usr/bin/env python
"""Checkpoint conversion HF <-> Megatron; same as the `desmoe-convert` command.

  python tools/convert_checkpoint.py hf-to-megatron HF_DIR OUT_DIR
  torchrun --nproc-per-node 4 tools/convert_checkpoint.py hf-to-megatron HF_DIR OUT_DIR --tp 2 --pp 2 --ep 2
  python tools/convert_checkpoint.py megatron-to-hf MEGATRON_DIR OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_desmoe.conversion.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
