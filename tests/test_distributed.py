"""find_safe_batch_size and the trainer under torch.distributed: 2 CPU processes, gloo on 127.0.0.1.

The probe scenarios run in spawned ranks (tests/distributed_targets.py); the trainer runs under the real
launcher, torchrun, and is compared with one process at the same global batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from distributed_targets import FailsAbove, probe, run_rank

from mps_autobatch import find_safe_batch_size
from mps_autobatch.devices import CPUBackend
from mps_autobatch.simulate import simulated_backend

pytestmark = pytest.mark.timeout(240)
MiB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(name: str, folder: Path, world: int = 2) -> list[dict]:
    mp.spawn(run_rank, args=(world, _free_port(), name, str(folder)), nprocs=world, join=True)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]


def test_ranks_with_different_limits_run_the_same_trials_and_answer_for_the_tighter_one(tmp_path):
    alone = [probe("256MiB").batch_size, probe("160MiB").batch_size]
    assert alone[1] < alone[0]
    ranks = _ranks("different_limits", tmp_path)
    assert ranks[0]["probe"]["trials"] == ranks[1]["probe"]["trials"]  # in lockstep: rank 0 picked every size
    assert ranks[0]["probe"]["batch_size"] == ranks[1]["probe"]["batch_size"]
    for seen in ranks:
        # Each trial counts as the tighter rank saw it (its peak as a fraction of its own limit): rank 1's answer,
        # within the rounding of a search that rank 0 steered with its own idle reading.
        assert abs(seen["probe"]["batch_size"] - alone[1]) <= 0.03 * alone[1]
        # Two ranks on one host split the CPU's default limit (half of RAM, at most 4 GiB).
        assert seen["cpu_limit"]["bytes"] == pytest.approx(CPUBackend().limit().bytes // 2, rel=0.05)
        assert seen["cpu_limit"]["source"].endswith(", split between 2 ranks on this host")


def test_an_out_of_memory_error_on_one_rank_limits_every_rank(tmp_path):
    alone = probe("256MiB").batch_size
    assert alone > 100  # rank 0 alone would go past the size rank 1 cannot run
    ranks = _ranks("oom_on_one_rank", tmp_path)
    sizes = [seen["probe"]["batch_size"] for seen in ranks]
    assert sizes[0] == sizes[1] <= 100
    trials = [seen["probe"]["trials"] for seen in ranks]
    assert [t[:2] for t in trials[0]] == [t[:2] for t in trials[1]]
    # Rank 0 ran those sizes and they fit; it counts them as out of memory because rank 1 did.
    failed = [(size, error) for size, outcome, error in trials[0] if outcome == "oom"]
    assert failed and all(
        size > 100 and error.startswith("another rank: MPS backend out of memory") for size, error in failed
    )


def test_an_error_on_one_rank_stops_every_rank_with_it(tmp_path):
    ranks = _ranks("error_on_one_rank", tmp_path)
    assert ranks[1]["probe"]["error"] == "ValueError"
    assert ranks[1]["probe"]["message"].startswith("bad batch of ")
    assert ranks[0]["probe"] == {
        "error": "AutobatchError",
        "message": f"Rank 1 stopped the probe: ValueError: {ranks[1]['probe']['message']}",
    }


def test_no_size_fitting_on_one_rank_is_no_size_for_all(tmp_path):
    ranks = _ranks("no_fit_on_one_rank", tmp_path)
    assert ranks[1]["probe"]["error"] == "NoBatchSizeFits"
    assert ranks[0]["probe"]["error"] == "NoBatchSizeFits"
    # Rank 1's warm-up ran out of memory even at one sample; rank 0, in lockstep, counts it as its own.
    assert ranks[1]["probe"]["message"].startswith(
        "No batch size fits in 65.00 MiB: the warm-up step at batch size 1 ran out of memory (MPS backend out of memory"
    )
    assert ranks[0]["probe"]["message"].startswith(
        "No batch size fits in 256.00 MiB: the warm-up step at batch size 1 ran out of memory (Rank 1 ran out of "
        "memory: MPS backend out of memory"
    )


def test_rank_0_decides_cache_hits_and_only_rank_0_writes(tmp_path, monkeypatch):
    settings = {
        "input_shape": [3, 32, 32],
        "num_classes": 10,
        "memory_limit": 96 * MiB,
        "headroom": 0.2,
        "max_batch_size": 512,
    }
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "cache0"))
    stored = find_safe_batch_size(
        "test_efficientnet",
        device=simulated_backend("mps:16GiB"),
        cache=True,
        **{**settings, "input_shape": (3, 32, 32)},
    )
    assert not stored.cached and len(list((tmp_path / "cache0").iterdir())) == 1
    ranks = _ranks("cache_decided_by_rank_0", tmp_path)
    assert ranks == [{"batch_size": stored.batch_size, "from_cache": True}] * 2
    assert not (tmp_path / "cache1").exists()  # rank 1 neither probed nor wrote


# --- the trainer under torchrun ------------------------------------------------------------------------------


def _train(folder: Path, processes: int, batch: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    args = [
        *(launcher if processes > 1 else [sys.executable]),
        "-m",
        "mps_autobatch.train",
        "--dataset=synthetic",
        "--model=test_vit",  # LayerNorm, no BatchNorm, no dropout: the global batch alone decides each update
        "--image-size=32",
        "--dev-samples=48",
        "--epochs=2",
        f"--batch-size={batch}",
        "--amp=off",
        # SGD: Adam divides by the gradient's own scale, which turns the rounding noise of a key bias's
        # (mathematically zero) gradient into whole-sized updates that differ between 1 and 2 processes.
        "--optimizer=sgd",
        "--device=cpu",
        "--workers=0",
        f"--output={folder}",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=200)


def test_two_processes_train_the_same_weights_as_one_with_the_same_global_batch(tmp_path):
    one = _train(tmp_path / "one", 1, 8)
    two = _train(tmp_path / "two", 2, 4)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    single = torch.load(tmp_path / "one" / "last.pt", weights_only=False)
    double = torch.load(tmp_path / "two" / "last.pt", weights_only=False)
    assert single["state"]["update"] == double["state"]["update"] > 4
    for name, weight in single["model"].items():
        torch.testing.assert_close(double["model"][name], weight, rtol=1e-4, atol=1e-5, msg=name)
    # Evaluation is split between the ranks and summed: the same numbers as one process.
    for a, b in zip(single["metrics"], double["metrics"]):
        assert a["val_top1"] == b["val_top1"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert b["images_per_s"] > 0 and a["effective_batch_size"] == 2 * b["effective_batch_size"]


def test_sync_bn_on_the_cpu_is_one_clear_error(tmp_path):
    result = _train(tmp_path / "run", 2, 4, "--sync-bn")
    assert result.returncode != 0
    assert "Error: --sync-bn needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs only)." in result.stderr


def test_one_process_ignores_the_distributed_helpers():
    from mps_autobatch import distributed

    assert distributed.rank_and_world() == (0, 1)
    assert distributed.agree_max(3) == 3 and distributed.from_rank_zero("size") == "size"
    model = FailsAbove()
    backend = CPUBackend()
    assert distributed.init_from_env(backend) == (False, backend)
    distributed.average_gradients(model.parameters())  # nothing to average with
