"""desmoe-profile under torchrun with 2 gloo ranks: expert parallel and pipeline parallel
layouts run, and the JSON reports the layout and a per-rank throughput."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(args, out: Path) -> dict:
    # the in-process tests leave a world of one in os.environ: do not hand it down
    env = {k: v for k, v in os.environ.items()
           if k not in _DIST_VARS and not k.startswith("TORCHELASTIC_")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_port()),
               str(REPO / "tools" / "profile_throughput.py"), "--preset", "mixtral-tiny",
               "--seq-len", "32", "--micro-batch", "2", "--warmup", "1", "--steps", "1",
               "--no-plot", "--out-dir", str(out), *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return json.loads((out / "profile.json").read_text())


@pytest.mark.multirank
@pytest.mark.parametrize("layout, flags", [
    ("ep2", ["--ep", "2"]),
    ("pp2", ["--pp", "2", "--num-microbatches", "2"]),
])
def test_two_rank_layouts(tmp_path, layout, flags):
    result = _torchrun(flags, tmp_path / layout)
    parallel = result["parallel"]
    assert parallel["world_size"] == 2
    if layout == "ep2":
        assert parallel["expert_parallel"] == 2 and parallel["data_parallel"] == 2
        assert result["workload"]["global_batch_sequences"] == 2 * 2  # micro-batch x DP
    else:
        assert parallel["pipeline_parallel"] == 2 and parallel["data_parallel"] == 1
        assert result["workload"]["global_batch_sequences"] == 2 * 2  # micro-batch x 2 micro-batches
    assert [r["router"] for r in result["runs"]] == ["stock", "desmoe"]
    for run in result["runs"]:
        seconds = run["step_time"]["median_s"]
        tokens = result["workload"]["tokens_per_step"]
        assert run["tokens_per_s_per_gpu"] == pytest.approx(tokens / seconds / 2)
    assert result["desmoe_overhead"]["fp32"] > 0
