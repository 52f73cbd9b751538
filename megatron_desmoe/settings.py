"""The one setting through which tests, examples and the quickstart find the shared corpus.

Tools never read this: they take paths as arguments.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Environment variable that points at the six-domain corpus (the folder holding
#: general/, math/, code/, law/, intent/, summary/, translation/).
DATA_DIR_ENV = "DESMOE_DATA_DIR"


def domain_data_dir() -> Path:
    """Where the multi-domain corpus lives: $DESMOE_DATA_DIR, else ../shared/data/domains."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return (REPO_ROOT.parent / "shared" / "data" / "domains").resolve()


def cache_dir() -> Path:
    """Where derived artefacts (tokenizer, indexed data, tiny base model) are cached."""
    return Path(os.environ.get("DESMOE_CACHE_DIR", REPO_ROOT / ".cache")).expanduser().resolve()
