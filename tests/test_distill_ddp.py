"""Two gloo processes (torchrun) apply the same memory-bank update from all-gathered features."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from toist_core.distill.cluster import ClusterModule
from toist_core.distill.config import DistillConfig

WORKER = Path(__file__).resolve().parent / "_ddp_bank_worker.py"
REPO = Path(__file__).resolve().parents[1]


def _worker_config():
    spec = importlib.util.spec_from_file_location("_ddp_bank_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIG


CONFIG = _worker_config()


def test_two_ranks_apply_the_same_bank_update(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert rank0["world_size"] == rank1["world_size"] == 2
    for key in ("feature_bank", "cluster_centers", "update_count", "full_label"):
        assert torch.equal(rank0["bank"][key], rank1["bank"][key]), key

    # Replaying every step in one process with both ranks' features (rank order) gives the
    # same bank: the update used the gathered features of both ranks, not only local ones.
    replay = ClusterModule(DistillConfig(**CONFIG)).bank
    for (f0, t0), (f1, t1) in zip(rank0["contributed"], rank1["contributed"]):
        replay.update(torch.cat([f0, f1]), torch.cat([t0, t1]))
    for key, value in replay.state_dict().items():
        assert torch.equal(value, rank0["bank"][key]), key
    # The run went past the filling phase into the "closest" replacement on both used tasks.
    assert rank0["bank"]["full_label"].tolist() == [1.0, 1.0, 0.0]
    assert rank0["bank"]["update_count"][2] == 0
    local_only = ClusterModule(DistillConfig(**CONFIG)).bank
    for f0, t0 in rank0["contributed"]:
        local_only.update(f0, t0)
    assert not torch.equal(local_only.feature_bank, rank0["bank"]["feature_bank"])

    # Variable-size all_gather (0 rows on rank 0, 1 on rank 1) and the num_boxes average.
    assert rank0["gathered"].tolist() == rank1["gathered"].tolist() == [[0.0, 1.0]]
    assert rank0["num_boxes"] == rank1["num_boxes"] == 2.0
