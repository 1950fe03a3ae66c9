"""What each rank runs in tests/test_distributed.py: spawned processes joined in a gloo group on 127.0.0.1.

Each scenario writes what its rank saw to ``<folder>/rank<N>.json``; exceptions are recorded, not
raised, so the test can assert every rank's outcome.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MPS_OOM = (
    "MPS backend out of memory (MPS allocated: 1.20 GiB, other allocations: 64.00 MiB, max allowed: 1.30 GiB). "
    "Tried to allocate 64.00 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit "
    "for memory allocations (may cause system failure)."
)


class FailsAbove(nn.Module):
    """A small conv net whose forward raises ``error`` for batches above ``above`` (None: never)."""

    def __init__(self, above: int | None = None, error: str = "oom") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 32 * 32, 10))
        self.above, self.error, self.num_classes = above, error, 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.above is not None and x.shape[0] > self.above:
            raise RuntimeError(MPS_OOM) if self.error == "oom" else ValueError(f"bad batch of {x.shape[0]} here")
        return self.body(x)


def probe(limit: str, above: int | None = None, error: str = "oom") -> Any:
    from mps_autobatch import find_safe_batch_size
    from mps_autobatch.simulate import simulated_backend

    return find_safe_batch_size(
        FailsAbove(above, error),
        input_shape=(3, 32, 32),
        num_classes=10,
        device=simulated_backend("mps:16GiB"),
        memory_limit=limit,
        max_batch_size=2048,
    )


def _outcome(run: Any) -> dict[str, Any]:
    try:
        result = run()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc).splitlines()[0]}
    return {
        "batch_size": result.batch_size,
        "max_batch_size": result.max_batch_size,
        "note": result.note,
        "trials": [[t.batch_size, t.outcome, t.error] for t in result.trials],
    }


def _scenario(name: str, rank: int, folder: Path) -> dict[str, Any]:
    if name == "different_limits":
        seen = {"probe": _outcome(lambda: probe(["256MiB", "160MiB"][rank]))}
        from mps_autobatch import find_safe_batch_size

        # The CPU's default limit is RAM's: two ranks on one host get half each.
        cpu = find_safe_batch_size(FailsAbove(), input_shape=(3, 32, 32), device="cpu", max_batch_size=8)
        seen["cpu_limit"] = {"bytes": cpu.limit_bytes, "source": cpu.limit_source}
        return seen
    if name == "oom_on_one_rank":
        return {"probe": _outcome(lambda: probe("256MiB", above=[None, 100][rank]))}
    if name == "error_on_one_rank":
        return {"probe": _outcome(lambda: probe("256MiB", above=[None, 16][rank], error="value"))}
    if name == "no_fit_on_one_rank":
        return {"probe": _outcome(lambda: probe(["256MiB", "65MiB"][rank]))}
    if name == "cache_decided_by_rank_0":
        from mps_autobatch import find_safe_batch_size
        from mps_autobatch.simulate import simulated_backend

        os.environ["AUTOBATCH_CACHE_DIR"] = str(folder / f"cache{rank}")  # only rank 0's holds an answer
        settings = json.loads((folder / "settings.json").read_text())
        settings["input_shape"] = tuple(settings["input_shape"])
        backend = simulated_backend("mps:16GiB")
        result = find_safe_batch_size("test_efficientnet", device=backend, cache=True, **settings)
        return {"batch_size": result.batch_size, "from_cache": result.cached}
    raise ValueError(f"unknown scenario {name!r}")


def run_rank(rank: int, world: int, port: int, name: str, folder: str) -> None:
    """The entry point for `torch.multiprocessing.spawn`: join the group, run the scenario, record it."""
    os.environ["LOCAL_WORLD_SIZE"] = str(world)  # as torchrun sets it: all ranks on this host
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    seen = _scenario(name, rank, Path(folder))
    Path(folder, f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()  # no rank tears the group down while the other still uses it
    dist.destroy_process_group()
    # Skip the interpreter's teardown: torch's static objects still own a joinable thread after a gloo group
    # and abort the process (std::terminate, SIGABRT) in about one exit in three here. Everything is written.
    os._exit(0)
