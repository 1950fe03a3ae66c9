"""What a batch is: one example batched to any size, how it reaches the model, its loss, and the worst case.

An example is one sample in the structure the model takes; `batch_of` stacks copies of it (torch's
``default_collate``, or the caller's ``collate_fn``). Three structures, three conventions:

- a **dict** ``{"input_ids": ..., "labels": ...}``: ``model(**batch)``; the loss is ``loss_fn(output, batch)``
  when given, else the output's ``.loss`` or ``["loss"]`` (the Hugging Face convention);
- a **pair** ``(inputs, target)``: ``model(inputs)``, or ``model(*inputs)`` when ``inputs`` is a tuple; the loss is
  ``loss_fn(output, target)``, cross-entropy by default;
- a **tensor**: ``model(x)`` with synthetic class targets (the ``input_shape`` shorthand is this with random values).

Example:
    >>> import torch
    >>> example = {"input_ids": torch.zeros(16, dtype=torch.long), "labels": torch.tensor(1)}
    >>> kind_of(example), describe(example)
    ('dict', '{input_ids: int64[16], labels: int64[]}')
    >>> {name: tuple(t.shape) for name, t in batch_of(example, 4).items()}
    {'input_ids': (4, 16), 'labels': (4,)}
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import default_collate

__all__ = [
    "DEFAULT_MAX_SAMPLES",
    "Kind",
    "WorstCase",
    "batch_of",
    "call_model",
    "check_model_input",
    "describe",
    "elements",
    "kind_of",
    "loss_of",
    "to_device",
    "worst_case",
]

Kind = Literal["tensor", "pair", "dict"]

DEFAULT_MAX_SAMPLES = 10_000
"""`worst_case` reads at most this many samples of a dataset, evenly spread over it."""


def kind_of(example: object) -> Kind:
    """Which convention an example follows: "dict", "pair" (inputs, target) or "tensor".

    Example:
        >>> kind_of(torch.zeros(3)), kind_of((torch.zeros(3), 1)), kind_of({"x": torch.zeros(3)})
        ('tensor', 'pair', 'dict')
    """
    if isinstance(example, Mapping):
        _no_lists(example)
        return "dict"
    if isinstance(example, (tuple, list)) and len(example) == 2:
        _no_lists(example)
        return "pair"
    if isinstance(example, (torch.Tensor, np.ndarray)):
        return "tensor"
    raise TypeError(
        f"example must be one sample: a tensor, an (inputs, target) pair or a dict of tensors, got "
        f"{type(example).__name__}{f' of {len(example)}' if isinstance(example, (tuple, list)) else ''}. "
        "Pass e.g. example=(torch.randn(3, 224, 224), 0) or example={'input_ids': ids, 'labels': labels}."
    )


def _no_lists(example: Mapping[str, Any] | Sequence[Any]) -> None:
    """``default_collate`` turns a list of numbers into one tensor per position: say so before it reaches the model."""
    items = example.items() if isinstance(example, Mapping) else enumerate(example)
    for name, value in items:
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            raise TypeError(
                f"example[{name!r}] is a Python list of numbers, which torch's default_collate batches into one "
                "tensor per position: pass collate_fn= (e.g. a padding collator such as transformers' "
                "DataCollatorWithPadding), or make the sample's values tensors."
            )


def describe(value: object) -> str:
    """The structure, dtypes and shapes of a sample, as the cache key holds them (values do not matter).

    Example:
        >>> describe((torch.zeros(3, 8), 2))
        '(float32[3,8], int)'
    """
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}[{','.join(map(str, value.shape))}]"
    if isinstance(value, np.ndarray):
        return f"{value.dtype}[{','.join(map(str, value.shape))}]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key}: {describe(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(describe(item) for item in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    return type(value).__name__


def elements(sample: object) -> int:
    """How many values a sample holds: tensor and array elements, one per other leaf (e.g. each token id in a list).

    Example:
        >>> elements({"input_ids": torch.zeros(128), "labels": 3}), elements({"input_ids": [5, 6, 7]})
        (129, 3)
    """
    leaves, _ = tree_flatten(sample)
    return sum(leaf.numel() if isinstance(leaf, torch.Tensor) else getattr(leaf, "size", 1) for leaf in leaves)


def batch_of(example: Any, batch_size: int, collate_fn: Callable[[list[Any]], Any] | None = None) -> Any:
    """``batch_size`` copies of ``example`` collated into one batch, on the host, as a DataLoader hands it over.

    Example:
        >>> inputs, target = batch_of((torch.zeros(3, 8), 2), 5)
        >>> tuple(inputs.shape), target.tolist()
        ((5, 3, 8), [2, 2, 2, 2, 2])
    """
    return (collate_fn or default_collate)([example] * batch_size)


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a batch moved to ``device`` (non-blocking), its structure kept (a mapping becomes a dict)."""
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        batch = dict(batch)  # e.g. a tokenizer's BatchEncoding, which torch's tree functions see as one leaf
    return tree_map(lambda leaf: leaf.to(device, non_blocking=True) if isinstance(leaf, torch.Tensor) else leaf, batch)


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """The forward by the example's convention: ``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple.

    ``default_collate`` turns a tuple into a list, so a list is spread too.

    Example:
        >>> call_model(lambda x, mask: x * mask, (torch.tensor(2.0), torch.tensor(3.0))).item()
        6.0
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def loss_of(output: Any, batch: Mapping[str, Any], loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> torch.Tensor:
    """A dict batch's loss: ``loss_fn(output, batch)``, else the output's ``.loss`` or ``["loss"]``.

    Example:
        >>> loss_of({"loss": torch.tensor(2.0)}, {}, None).item()
        2.0
    """
    if loss_fn is not None:
        return loss_fn(output, batch)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        found = "its .loss is None" if hasattr(output, "loss") else f"got {type(output).__name__}"
        if "labels" in batch:
            raise TypeError(
                f"The model's output has no loss for a dict batch ({found}) although the batch has 'labels': "
                "pass loss_fn=lambda output, batch: ... to compute it from the output and the batch."
            )
        raise TypeError(
            f"The model's output has no loss for a dict batch ({found}): put the labels in the example (e.g. "
            "'labels') if the model computes its own loss, or pass loss_fn=lambda output, batch: ..."
        )
    return loss


@dataclass(frozen=True)
class WorstCase:
    """The sample of a dataset that needs the most memory, and how it was found.

    Attributes:
        index: its index in the dataset.
        example: the sample itself.
        elements: how many values it holds (`elements`).
        read: how many samples were read to find it.
        total: the dataset's length.
    """

    index: int
    example: Any
    elements: int
    read: int
    total: int

    def describe(self) -> str:
        """One line for a note and the report.

        Example:
            >>> WorstCase(7, None, 512, 10_000, 50_000).describe()
            'worst case: sample 7 (512 values), the largest of 10,000 read of 50,000 (evenly spread)'
        """
        over = f"of all {self.total:,}"
        if self.read < self.total:
            over = f"of {self.read:,} read of {self.total:,} (evenly spread)"
        return f"worst case: sample {self.index} ({self.elements:,} values), the largest {over}"


def worst_case(dataset: Sequence[Any], max_samples: int = DEFAULT_MAX_SAMPLES) -> WorstCase:
    """The sample with the most values (e.g. the longest sequence), over at most ``max_samples`` samples.

    A padding collator pads every batch to its longest sample, so the batch that needs the most memory is the
    longest sample and copies of it padded to its length. A large dataset is read at ``max_samples`` evenly
    spread indices; the first of equal samples wins.

    Example:
        >>> data = [torch.zeros(n) for n in (3, 9, 5, 9)]
        >>> pick = worst_case(data)
        >>> pick.index, pick.elements, pick.read
        (1, 9, 4)
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"dataset must be map-style (len() and indexing), got {type(dataset).__name__}. For an IterableDataset, "
            "pass example= with its longest sample."
        )
    total = len(dataset)
    if total == 0:
        raise ValueError("dataset is empty: pass a dataset with at least one sample, or example=.")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise ValueError(f"max_samples must be a positive int, got {max_samples!r}.")
    indices = range(total) if total <= max_samples else np.linspace(0, total - 1, max_samples).round().astype(int)
    best: tuple[int, Any, int] | None = None
    for index in dict.fromkeys(int(i) for i in indices):
        sample = dataset[index]
        size = elements(sample)
        if best is None or size > best[2]:
            best = (index, sample, size)
    assert best is not None
    return WorstCase(best[0], best[1], best[2], len(indices), total)


def check_model_input(model: nn.Module, inputs: Any, *, from_shape: Sequence[int] | None = None) -> None:  # noqa: C901
    """Say in one line what is wrong with a model and its input before any step runs.

    ``inputs`` is what the forward receives (a batch of two, already on the device, or without it on the meta
    device); ``from_shape`` is the ``input_shape`` it was built from, if it was.

    Raises:
        ValueError: the model is on the meta device, or ``input_shape`` lacks the channels its first convolution
            takes.
        TypeError: the forward needs more (or other) arguments than the batch gives.
    """
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"The model's parameters are on the meta device (e.g. {meta}), with no data to train: build it on a real "
            "device, or call model.to_empty(device='cpu') and load its weights, before probing."
        )
    if from_shape is not None:
        _check_channels(model, tuple(from_shape), "input_shape")
    elif isinstance(inputs, torch.Tensor):
        _check_channels(model, tuple(inputs.shape), "the example's shape")
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return  # a forward torch cannot describe (a C extension): the first step will say
    try:
        if isinstance(inputs, Mapping):
            signature.bind(**inputs)
        elif isinstance(inputs, (tuple, list)):
            signature.bind(*inputs)
        else:
            signature.bind(inputs)
    except TypeError as exc:
        given = (
            f"the keys {', '.join(map(repr, inputs))}"
            if isinstance(inputs, Mapping)
            else f"{len(inputs)} inputs"
            if isinstance(inputs, (tuple, list))
            else "one input"
        )
        raise TypeError(
            f"{type(model).__name__}.forward({', '.join(signature.parameters)}) cannot take {given} ({exc}). "
            "Pass example= with one real sample in the structure forward takes: ((x, mask), target) for several "
            "inputs, or a dict of its arguments."
        ) from None


def _check_channels(model: nn.Module, shape: tuple[int, ...], what: str) -> None:
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        return
    dims = len(conv.kernel_size)  # spatial dimensions; one sample is (channels, *spatial)
    channels = conv.in_channels

    def fix(shape: tuple[int, ...]) -> str:
        return f"input_shape={shape}" if what == "input_shape" else f"a sample of shape {shape}"

    # A model that adds a channel itself starts with a one-channel convolution.
    if len(shape) == dims and channels > 1:
        raise ValueError(
            f"{what} {shape} has no channel dimension, but the model's first convolution takes {channels} "
            f"channels: pass {fix((channels, *shape))}."
        )
    if len(shape) == dims + 1 and shape[0] != channels and shape[-1] == channels:
        raise ValueError(
            f"{what} {shape} puts the channels last (height, width, channels), but the model takes them first: "
            f"pass {fix((channels, *shape[:-1]))}."
        )
