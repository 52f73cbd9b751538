"""Skip tests whose hardware or libraries are absent (markers declared in pyproject.toml).

* `cuda`: needs a CUDA GPU; skipped where torch.cuda.is_available() is False.
* `te`: needs Transformer Engine; skipped where `import transformer_engine` fails (it raises
  RuntimeError, not ImportError, without CUDA) and wherever CUDA is absent.
"""

from __future__ import annotations

import functools

import pytest
import torch


@functools.lru_cache(maxsize=None)
def _te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 -- TE raises RuntimeError without CUDA / on a bad build
        return False
    return True


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_te = pytest.mark.skip(reason="needs Transformer Engine on a CUDA GPU")
    cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("cuda") is not None and not cuda:
            item.add_marker(skip_cuda)
        if item.get_closest_marker("te") is not None and not _te_available():
            item.add_marker(skip_te)
