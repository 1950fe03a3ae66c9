"""`mps_autobatch.lightning.BatchSizeFinder` with real Lightning, on the simulated Mac (256 MiB) and the CPU.

The module (`lightning_targets.MLP`, 256-2048-2048-10, AdamW) logs in its steps, as most do. On the simulated
Mac at 256 MiB its optimizer step, not its activations, sets the tensor peak up to ~650 samples, and the
allocator's readings depend on what ran before: a search from 80 % of 4,096 (over the limit) answers 624, one
from 2 answers 2,048 (a plain fit at 2,048 peaks at 233 MiB, under the limit and over the budget).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_targets import MLP, trainer

from mps_autobatch.errors import AutobatchError
from mps_autobatch.lightning import BatchSizeFinder
from mps_autobatch.simulate import simulated_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _finder(**options: object) -> BatchSizeFinder:
    return BatchSizeFinder(device=simulated_backend("mps:16GiB"), memory_limit="256MiB", **options)  # type: ignore[arg-type]


class _Snapshot:
    """What the fit looks like when the first callback after the finder runs: weights, optimizer, trainer state."""

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    def on_fit_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self.seen = {
            "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
            "optimizer_state": dict(trainer.optimizers[0].state),
            "global_step": trainer.global_step,
            "fit_loop": trainer.fit_loop.state_dict(),
            "max_steps": trainer.max_steps,
            "limits": (trainer.limit_train_batches, trainer.limit_val_batches),
            "callbacks": list(trainer.callbacks),
            "loggers": list(trainer.loggers),
        }


def _snapshot_callback() -> tuple[object, _Snapshot]:
    import lightning.pytorch as L

    snapshot = _Snapshot()
    return type("SnapshotCallback", (L.Callback,), {"on_fit_start": snapshot.on_fit_start})(), snapshot


def test_requested_is_the_effective_batch_a_fitting_divisor_times_the_accumulation(tmp_path: Path) -> None:
    module = MLP()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    fresh = trainer([], str(tmp_path)).fit_loop.state_dict()
    finder, (recorder, snapshot) = _finder(requested=4096), _snapshot_callback()
    run = trainer([finder, recorder], str(tmp_path))
    run.fit(module)

    assert finder.result is not None and finder.result.batch_size == 624
    assert [t.batch_size for t in finder.result.trials][:2] == [3276, 1638]  # 80 % of 4,096, then down
    chosen = next(t for t in finder.result.trials if t.batch_size == 624)
    assert chosen.ok and chosen.peak_bytes is not None and chosen.peak_bytes <= finder.result.budget_bytes
    plan = finder.plan
    assert plan is not None and (plan.micro, plan.accumulation, plan.exact) == (512, 8, True)  # 512 >= 80 % of 624
    assert finder.optimal_batch_size == module.hparams.batch_size == 512 and run.accumulate_grad_batches == 8
    assert finder.result.accumulation == (512, 8)
    assert module.seen[-16:] == [512] * 16  # the fit's own loader, rebuilt at the new size: two updates of 8 x 512
    # What the fit started from, once the finder was done: the weights, an empty optimizer, a fresh trainer.
    assert all(torch.equal(snapshot.seen["weights"][k], before[k]) for k in before)  # type: ignore[index]
    assert snapshot.seen["optimizer_state"] == {} and snapshot.seen["global_step"] == 0
    assert snapshot.seen["fit_loop"] == fresh and snapshot.seen["max_steps"] == 2
    assert snapshot.seen["limits"] == (1.0, 1) and snapshot.seen["loggers"] == []
    assert snapshot.seen["callbacks"] == run.callbacks
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary file


def test_without_a_fitting_divisor_the_largest_size_and_the_smallest_accumulation_above(tmp_path: Path) -> None:
    module = MLP()
    finder = _finder(requested=4099)  # a prime: its only divisors are 1 and 4,099
    run = trainer([finder], str(tmp_path), max_steps=1)
    run.fit(module)
    plan = finder.plan
    assert plan is not None and (plan.micro, plan.accumulation, plan.exact) == (630, 7, False)
    assert plan.note == (
        "No divisor of 4099 within 80% of the largest size that fits (630): 630 x 7 = 4410, an effective batch of 4410."
    )
    assert module.hparams.batch_size == 630 and run.accumulate_grad_batches == 7


def test_without_requested_the_largest_safe_size_and_an_eval_size_of_its_own(tmp_path: Path) -> None:
    module = MLP()
    finder = _finder(init_val=16, eval_batch_arg_name="eval_batch_size")
    run = trainer([finder], str(tmp_path), max_steps=1, accumulate_grad_batches=3)
    run.fit(module)
    assert finder.result is not None and finder.eval_result is not None
    assert finder.result.trials[0].batch_size == 16  # init_val: where the search starts
    assert (finder.optimal_batch_size, module.hparams.batch_size, run.accumulate_grad_batches) == (2048, 2048, 3)
    assert (finder.result.mode, finder.eval_result.mode) == ("train", "eval")
    # The whole validation set fits at once: the eval probe stops at its length, as Lightning's finder does.
    assert module.hparams.eval_batch_size == finder.eval_result.batch_size == 4096
    assert run.val_dataloaders.batch_size == 4096  # the validation loader, rebuilt at the eval size


def test_manual_optimization_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AutobatchError) as caught:
        trainer([_finder()], str(tmp_path)).fit(MLP(manual=True))
    assert str(caught.value) == (
        "BatchSizeFinder probes automatic optimization (training_step returns the loss); this module uses manual "
        "optimization. Probe its step with find_safe_batch_size(step_function) instead."
    )


def test_a_missing_batch_size_attribute_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AutobatchError) as caught:
        trainer([_finder(batch_arg_name="bs")], str(tmp_path)).fit(MLP())
    assert str(caught.value) == (
        "BatchSizeFinder writes the batch size to 'bs', which neither the module, its hparams nor the datamodule "
        "has. Add a 'bs' attribute that the dataloaders read, or pass batch_arg_name=."
    )


def test_two_ddp_ranks_on_gloo_run_the_same_trials_and_agree_on_one_size(tmp_path: Path) -> None:
    script = Path(__file__).parent / "lightning_targets.py"
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in done.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1]
    first, second = results
    assert first["trials"] == second["trials"] and first["micro"] == second["micro"]
    # 300 MiB for each rank (DDP's gradient buckets and the all-reduce buffer on top of one process's memory).
    assert first["trials"] == [3276, 2502, 2607]
    assert (first["micro"], first["accumulation"]) == (2048, 2)  # 2,048 >= 80 % of the 2,502 that fits
    assert first["seen"][-2:] == [2048, 2048]  # the fit itself, after the probe's own two steps


def test_validate_sizes_the_validation_step_in_eval_mode(tmp_path: Path) -> None:
    module = MLP()
    finder = _finder(eval_batch_arg_name="eval_batch_size")  # what this module's val_dataloader reads
    run = trainer([finder], str(tmp_path))
    run.validate(module)
    assert finder.eval_result is not None and finder.eval_result.mode == "eval" and finder.result is None
    assert finder.optimal_batch_size == module.hparams.eval_batch_size == finder.eval_result.batch_size == 4096
    assert module.seen_eval[-1] == 4096  # limit_val_batches=1: one batch, of the probed size
