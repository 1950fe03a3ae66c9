"""Any model, any batch: dict and pair examples, the worst case of a dataset, eval mode, and a target's mistakes.

Token models are built in torch (`token_models`); every probe runs on the simulated Mac, whose answers are
deterministic, so the sizes are asserted exactly.
"""

from __future__ import annotations

import re

import pytest
import torch
from token_models import EncoderClassifier, TinyCausalLM, classifier_loss, token_sample
from torch import nn

from mps_autobatch import find_safe_batch_size
from mps_autobatch.errors import AutobatchError
from mps_autobatch.inputs import WorstCase, batch_of, describe, worst_case
from mps_autobatch.simulate import simulated_backend


def _probe(target: object, limit: str = "512MiB", **options: object):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    backend = simulated_backend("mps:16GiB")
    return find_safe_batch_size(target, device=backend, memory_limit=limit, **options)  # type: ignore[arg-type]


def _answer_peak(result) -> int:  # type: ignore[no-untyped-def]
    return next(t.peak_bytes for t in result.trials if t.batch_size == result.batch_size and t.ok)


def test_encoder_on_dict_inputs_fits_at_128_and_512_and_the_longer_length_gets_the_smaller_batch() -> None:
    short = _probe(EncoderClassifier(), example=token_sample(128), loss_fn=classifier_loss)
    long = _probe(EncoderClassifier(), example=token_sample(512), loss_fn=classifier_loss)
    assert (short.batch_size, long.batch_size) == (78, 8)
    assert [t.batch_size for t in short.trials] == [2, 16, 92, 82, 73, 78]
    assert [t.batch_size for t in long.trials] == [2, 16, 9, 8]
    for result in (short, long):
        assert result.strategy == "measure" and result.mode == "train"
        assert _answer_peak(result) <= result.budget_bytes


def test_causal_lm_loss_from_its_output_object_and_eval_allows_a_larger_batch_than_training() -> None:
    example = token_sample(128, labels="lm")
    train = _probe(TinyCausalLM(), "256MiB", example=example)
    evaluation = _probe(TinyCausalLM(), "256MiB", example=example, mode="eval")
    assert (train.batch_size, evaluation.batch_size) == (24, 123)
    assert (train.mode, evaluation.mode) == ("train", "eval")
    assert _answer_peak(train) <= train.budget_bytes and _answer_peak(evaluation) <= evaluation.budget_bytes


def test_eval_mode_leaves_no_optimizer_state_and_puts_the_model_back_in_training_mode() -> None:
    model = TinyCausalLM()
    weights = [p.detach().clone() for p in model.parameters()]
    _probe(model, "256MiB", example=token_sample(64, labels="lm"), mode="eval")
    assert model.training
    assert all(torch.equal(p, w) and p.grad is None for p, w in zip(model.parameters(), weights))


def test_dataset_probe_uses_the_longest_sample_and_says_which() -> None:
    dataset = [token_sample(length) for length in (64, 200, 512, 128, 512)]
    result = _probe(EncoderClassifier(), dataset=dataset, loss_fn=classifier_loss)
    assert result.example_index == 2
    assert result.batch_size == 8  # the answer for copies of a 512-token sample, as in the test above
    assert result.note.endswith("Worst case: sample 2 (1,025 values), the largest of all 5.")


def test_worst_case_of_a_large_dataset_reads_at_most_max_samples_evenly_spread() -> None:
    lengths = [10] * 1000
    lengths[500] = 40  # on the evenly spread grid of 11 samples: 0, 100, ..., 1000 -> index 500 is read
    lengths[501] = 90  # between grid points: not read, and the note says the maximum is over those read
    data = [torch.zeros(n) for n in lengths]
    pick = worst_case(data, max_samples=11)
    assert (pick.index, pick.elements, pick.read, pick.total) == (500, 40, 11, 1000)
    assert pick.describe() == "worst case: sample 500 (40 values), the largest of 11 read of 1,000 (evenly spread)"


def test_an_explicit_example_wins_over_the_dataset() -> None:
    dataset = [token_sample(512)]
    result = _probe(EncoderClassifier(), example=token_sample(128), dataset=dataset, loss_fn=classifier_loss)
    assert result.batch_size == 78 and result.example_index is None


class _SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
        self.num_classes = 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_an_image_example_gives_the_same_answer_as_input_shape() -> None:
    by_shape = _probe(_SmallConvNet(), "256MiB", input_shape=(3, 32, 32))
    by_example = _probe(_SmallConvNet(), "256MiB", example=torch.randn(3, 32, 32))
    assert by_example.batch_size == by_shape.batch_size == 508
    assert [t.batch_size for t in by_example.trials] == [t.batch_size for t in by_shape.trials]


class _Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(x * mask)


def test_a_pair_with_tuple_inputs_is_fed_as_model_star_inputs_with_its_target() -> None:
    seen: list[int] = []
    model = _Masked()
    model.register_forward_pre_hook(lambda _, args: seen.append(len(args)))
    result = _probe(model, "256MiB", example=((torch.randn(32), torch.ones(32)), torch.tensor(3)), max_batch_size=64)
    assert result.batch_size == 64 and set(seen) == {2}


def test_batch_of_uses_a_collate_function_when_given() -> None:
    def pad_to_64(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(len(samples), 64, dtype=torch.long)
        for row, sample in enumerate(samples):
            ids[row, : len(sample["input_ids"])] = sample["input_ids"]
        return {"input_ids": ids}

    assert batch_of({"input_ids": torch.ones(10, dtype=torch.long)}, 3, pad_to_64)["input_ids"].shape == (3, 64)


def test_the_cache_key_holds_the_mode_and_the_example_structure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    options = {"cache": tmp_path, "limit": "256MiB"}
    train = _probe(TinyCausalLM(), example=token_sample(64, labels="lm"), **options)
    evaluation = _probe(TinyCausalLM(), example=token_sample(64, labels="lm"), mode="eval", **options)
    longer = _probe(TinyCausalLM(), example=token_sample(96, labels="lm"), **options)
    again = _probe(TinyCausalLM(), example=token_sample(64, labels="lm"), **options)
    assert (train.cached, evaluation.cached, longer.cached, again.cached) == (False, False, False, True)
    assert again.batch_size == train.batch_size and evaluation.batch_size > train.batch_size
    assert (
        describe(token_sample(64, labels="lm"))
        == "{input_ids: int64[64], attention_mask: int64[64], labels: int64[64]}"
    )


# --- what is wrong with a target, in one line, before any trial ---------------------------------------------


class _NoLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids).mean(1)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(x * mask)


MISTAKES = [
    pytest.param(
        lambda: _probe(_NoLoss(), example={"input_ids": torch.zeros(4, dtype=torch.long)}),
        TypeError,
        "The model's output has no loss for a dict batch (got Tensor): put the labels in the example (e.g. 'labels') "
        "if the model computes its own loss, or pass loss_fn=lambda output, batch: ...",
        id="dict-output-without-loss",
    ),
    pytest.param(
        lambda: _probe(TinyCausalLM(), example={"input_ids": torch.zeros(4, dtype=torch.long)}),
        TypeError,
        "The model's output has no loss for a dict batch (its .loss is None): put the labels in the example (e.g. "
        "'labels') if the model computes its own loss, or pass loss_fn=lambda output, batch: ...",
        id="loss-is-none-without-labels",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet, input_shape=(3, 32, 32)),
        TypeError,
        "target is the class _SmallConvNet, not a model: pass an instance, e.g. _SmallConvNet(...), or a "
        "step(batch_size) function.",
        id="class-not-instance",
    ),
    pytest.param(
        lambda: _probe(_TwoInputs(), input_shape=(8,), num_classes=2),
        TypeError,
        "_TwoInputs.forward(x, mask) cannot take one input (missing a required argument: 'mask'). Pass example= "
        "with one real sample in the structure forward takes: ((x, mask), target) for several inputs, or a dict of "
        "its arguments.",
        id="forward-needs-more-than-one-input",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet(), input_shape=(32, 32)),
        ValueError,
        "input_shape (32, 32) has no channel dimension, but the model's first convolution takes 3 channels: pass "
        "input_shape=(3, 32, 32).",
        id="shape-without-channels",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet().to("meta"), input_shape=(3, 32, 32)),
        ValueError,
        "The model's parameters are on the meta device (e.g. features.0.weight), with no data to train: build it on "
        "a real device, or call model.to_empty(device='cpu') and load its weights, before probing.",
        id="meta-device",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet(), example=[torch.zeros(3)]),
        TypeError,
        "example must be one sample: a tensor, an (inputs, target) pair or a dict of tensors, got list of 1. Pass "
        "e.g. example=(torch.randn(3, 224, 224), 0) or example={'input_ids': ids, 'labels': labels}.",
        id="example-of-unknown-structure",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet(), input_shape=(3, 32, 32), example=torch.zeros(3, 32, 32)),
        ValueError,
        "Pass input_shape or example, not both: example= already gives one sample's shape.",
        id="shape-and-example",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet(), input_shape=(3, 32, 32), mode="test"),
        ValueError,
        "Unknown mode 'test'. Use 'train' (a training step) or 'eval' (the forward alone).",
        id="unknown-mode",
    ),
]


def test_a_mistake_found_by_checks_runs_no_step() -> None:
    calls: list[int] = []
    model = _SmallConvNet()
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="no channel dimension"):
        _probe(model, input_shape=(32, 32))
    assert calls == []


def test_a_step_that_ignores_its_batch_size_falls_back_to_bisection_and_the_note_says_why() -> None:
    model = nn.Linear(256, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    prebuilt = torch.randn(64, 256)  # the mistake: built once, outside the step, whatever the size asked

    def step(batch_size: int) -> None:
        model(prebuilt).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    result = _probe(step, "256MiB", model=model, optimizer=optimizer, max_batch_size=4096)
    assert [t.batch_size for t in result.trials] == [2, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert result.strategy == "bisect" and result.batch_size == 3276  # 80% of the largest that ran: nothing measured
    assert result.note == (
        "Fell back to crash-driven bisection: the measured peak did not grow with the batch size; the likely cause "
        "is a step that reuses a batch built outside it (only what the step allocates is measured): create the batch "
        "inside step(batch_size)."
    )


def test_worst_case_description_for_every_sample_read() -> None:
    assert WorstCase(0, None, 3, 5, 5).describe() == "worst case: sample 0 (3 values), the largest of all 5"


def test_without_a_cap_a_step_that_ignores_its_batch_size_stops_with_one_line_instead_of_doubling_forever() -> None:
    model = nn.Linear(256, 10)
    prebuilt = torch.randn(64, 256)

    def step(batch_size: int) -> None:
        model(prebuilt).sum().backward()
        model.zero_grad()

    with pytest.raises(AutobatchError) as caught:
        _probe(step, "256MiB", model=model)
    assert str(caught.value) == (
        "The step's memory did not change from batch size 2 to 2097152 (96.00 KiB of tensors at each): it does not "
        "build its batch from batch_size, so no size can be measured. Create the batch inside step(batch_size)."
    )


MORE_MISTAKES = [
    pytest.param(
        lambda: _probe(_SmallConvNet(), example=torch.randn(32, 32)),
        ValueError,
        "the example's shape (32, 32) has no channel dimension, but the model's first convolution takes 3 channels: "
        "pass a sample of shape (3, 32, 32).",
        id="example-without-channels",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet(), input_shape=(32, 32, 3)),
        ValueError,
        "input_shape (32, 32, 3) puts the channels last (height, width, channels), but the model takes them first: "
        "pass input_shape=(3, 32, 32).",
        id="channels-last-shape",
    ),
    pytest.param(
        lambda: _probe(_NoLoss(), example={"input_ids": [1, 2, 3], "labels": 1}),
        TypeError,
        "example['input_ids'] is a Python list of numbers, which torch's default_collate batches into one tensor per "
        "position: pass collate_fn= (e.g. a padding collator such as transformers' DataCollatorWithPadding), or make "
        "the sample's values tensors.",
        id="list-of-token-ids-without-collate",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet(), input_shape=(3, 32, 32), dataset=[torch.zeros(3, 32, 32)]),
        ValueError,
        "Pass input_shape or dataset, not both: the dataset's samples give the shape.",
        id="shape-and-dataset",
    ),
    pytest.param(
        lambda: _probe(_SmallConvNet(), dataset=iter([torch.zeros(3, 32, 32)])),
        TypeError,
        "dataset must be map-style (len() and indexing), got list_iterator. For an IterableDataset, pass example= "
        "with its longest sample.",
        id="iterable-dataset",
    ),
    pytest.param(
        lambda: _probe(EncoderClassifier(), example=token_sample(16)),  # logits, and no loss_fn
        TypeError,
        "The model's output has no loss for a dict batch (got Tensor) although the batch has 'labels': pass "
        "loss_fn=lambda output, batch: ... to compute it from the output and the batch.",
        id="labels-but-no-loss",
    ),
]


@pytest.mark.parametrize(("call", "error", "message"), MISTAKES + MORE_MISTAKES)  # the second list: a new user's tries
def test_a_mistake_in_the_target_is_one_line_naming_the_fix(call, error, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call()


def test_a_dataset_probe_served_from_the_cache_still_says_which_sample(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dataset = [token_sample(length, labels="lm") for length in (32, 64, 48)]
    first = _probe(TinyCausalLM(), "256MiB", example=token_sample(64, labels="lm"), cache=tmp_path)
    again = _probe(TinyCausalLM(), "256MiB", dataset=dataset, cache=tmp_path)
    assert (first.cached, again.cached, again.example_index) == (False, True, 1)
    assert again.note.endswith("Worst case: sample 1 (192 values), the largest of all 3.")


def test_eval_mode_plans_no_accumulation() -> None:
    result = _probe(TinyCausalLM(), "256MiB", example=token_sample(64, labels="lm"), mode="eval", requested=1000)
    assert result.batch_size < 1000 and result.accumulation is None
