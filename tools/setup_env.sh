#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install megatron-desmoe into it.
#
#   bash tools/setup_env.sh            # -> .venv (override with DESMOE_VENV=path)
#
# Order matters:
#  1. torch is pinned and installed first. An unpinned torch (asked for by any package)
#     resolves to the newest CUDA build and several GB of NVIDIA wheels; once 2.13.0 is
#     present every later requirement is satisfied by it.
#  2. megatron-core 0.19 declares Requires-Python >= 3.12 yet ships cp311 wheels that work
#     on 3.11, so it is installed with --ignore-requires-python. --no-deps because
#     resolving its dependencies in that mode chose a numpy source build that fails; its
#     real dependencies (torch, numpy, packaging) come from step 1.
#  3. Transformer Engine only where a GPU exists (requirements-gpu.txt says why).
# Re-running is cheap: a stamp keyed on the requirement files skips finished installs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DESMOE_VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
key=$(cat requirements.txt requirements-megatron.txt requirements-gpu.txt pyproject.toml \
      tools/setup_env.sh | sha1sum | cut -c1-12)
stamp="$VENV/.desmoe-installed-$key"
if [ -f "$stamp" ]; then exit 0; fi
echo "[setup_env] installing into $VENV (first run takes a few minutes)" >&2
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q torch==2.13.0 numpy packaging
"$PY" -m pip install -q --no-deps --ignore-requires-python -r requirements-megatron.txt
"$PY" -m pip install -q -r requirements.txt
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-build-isolation -r requirements-gpu.txt \
    || echo "[setup_env] transformer-engine install failed: FP8 and the TE spec stay off" >&2
fi
"$PY" - <<'PY'
import importlib.util, sys
if importlib.util.find_spec("apex") is not None:
    import apex
    if not hasattr(apex, "optimizers") and "nvidia" not in (apex.__file__ or ""):
        sys.exit("[setup_env] an unrelated PyPI package named 'apex' is installed; "
                 "uninstall it (pip uninstall apex): it is not NVIDIA apex")
PY
rm -f "$VENV"/.desmoe-installed-*
touch "$stamp"
