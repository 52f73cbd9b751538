"""Launch helpers for multi-rank tests: torchrun (or plain python) in a subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Launch:
    returncode: int
    output: str
    seconds: float

    def tail(self, chars: int = 6000) -> str:
        return self.output[-chars:]


# Set in this process by an in-process world of one (megatron_desmoe.parallel.init_distributed)
# or by an outer torchrun; a child inheriting them would join that world's store.
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in _DIST_VARS and not key.startswith("TORCHELASTIC_")}
    env.update(
        TORCHDYNAMO_DISABLE="1",  # import megatron.core ~40% faster
        OMP_NUM_THREADS="1",  # several ranks share two cores
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    return env


def run(args: list[str], nproc: int = 0, timeout: float = 300.0) -> Launch:
    """`python args...` (nproc=0) or `python -m torch.distributed.run --nproc-per-node N`."""
    import time

    command = [sys.executable]
    if nproc:
        command += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                    "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += [str(a) for a in args]
    start = time.time()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and the ranks it started
        output, _ = process.communicate()
        output += f"\n[launch] killed after {timeout:.0f} s"
    return Launch(process.returncode, output, time.time() - start)
