"""`mps_autobatch.transformers.tune_trainer` with real transformers 5.x: a tiny BERT classifier and GPT-2 LM.

Built from configs (no download), random token data of mixed lengths, on the simulated Mac at 512 MiB.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from hf_targets import bert_trainer, gpt2, lm_data
from transformers import Trainer, TrainingArguments

from mps_autobatch.errors import AutobatchError
from mps_autobatch.simulate import simulated_backend
from mps_autobatch.transformers import tune_trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _options() -> dict[str, object]:
    return {"device": simulated_backend("mps:16GiB"), "memory_limit": "512MiB"}


def test_the_effective_batch_is_kept_the_eval_size_is_its_own_and_train_uses_both(tmp_path: Path) -> None:
    trainer = bert_trainer(str(tmp_path))  # 8 x 8: an effective batch of 64 per device
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = tune_trainer(trainer, **_options())
    args = trainer.args

    assert result.trials[0].batch_size == 51  # 80 % of the effective 64
    micro, steps = args.per_device_train_batch_size, args.gradient_accumulation_steps
    assert (micro, steps) == (32, 2) and micro * steps == 64 and result.accumulation == (32, 2)
    assert result.batch_size == 32  # the largest that fits: 64's largest divisor under it is itself
    chosen = next(t for t in result.trials if t.batch_size == 32)
    assert chosen.ok and chosen.peak_bytes is not None and chosen.peak_bytes <= result.budget_bytes
    assert args.per_device_eval_batch_size == 384 > micro  # prediction_step, probed apart
    assert result.example_index == 115  # the longest sample: 255 tokens and its label
    # Put back: the weights, no optimizer (train() builds its own), no attribute train() would set.
    assert trainer.optimizer is None and not hasattr(trainer, "current_gradient_accumulation_steps")
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())

    seen: list[int] = []
    trainer.model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    trainer.train()
    assert seen == [32] * 8  # 256 samples: 4 updates of 2 x 32, as set, not the 8 it was created with
    assert trainer.state.global_step == 4


def test_a_prime_effective_batch_takes_the_largest_size_and_the_smallest_accumulation_above(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no")
    trainer = Trainer(model=gpt2(), args=args, train_dataset=lm_data([128, 96, 64, 128]))
    result = tune_trainer(trainer, effective_batch_size=97, **_options())
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (62, 2)
    assert result.batch_size == 62 and trainer._train_batch_size == 62 and result.accumulation == (62, 2)
    assert result.note.endswith(
        "Per device: No divisor of 97 within 80% of the largest size that fits (62): 62 x 2 = 124, an effective "
        "batch of 124."
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"auto_find_batch_size": True},
            "TrainingArguments(auto_find_batch_size=True) would shrink the batch at 0.9x on every out-of-memory "
            "error, the effective batch with it: set auto_find_batch_size=False, tune_trainer sizes it by measuring.",
        ),
    ],
)
def test_settings_it_cannot_honour_are_one_clear_error(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(AutobatchError) as caught:
        tune_trainer(bert_trainer(str(tmp_path), **options), **_options())
    assert str(caught.value) == message


def test_without_a_train_dataset_one_clear_error(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(AutobatchError) as caught:
        tune_trainer(Trainer(model=gpt2(), args=args), **_options())
    assert str(caught.value) == "tune_trainer needs the trainer's train_dataset: pass Trainer(train_dataset=...)."
