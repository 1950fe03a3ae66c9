import pytest
import torch
from oom_texts import RUNTIME_OOM_TEXTS

from mps_autobatch import is_oom_error


@pytest.mark.parametrize("text", RUNTIME_OOM_TEXTS)
def test_every_known_runtime_text_is_an_oom(text):
    assert is_oom_error(RuntimeError(text))


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError(),  # no message at all: recognised by type
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
        MemoryError(),
    ],
)
def test_oom_types_are_recognised_without_reading_the_text(exc):
    assert is_oom_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError(),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)"),
        RuntimeError("invalid low watermark ratio 1.4"),
        ValueError("MPS backend out of memory"),  # the right words on the wrong type are not an OOM
        KeyError("out of memory"),
    ],
)
def test_other_exceptions_are_not_oom(exc):
    assert not is_oom_error(exc)
