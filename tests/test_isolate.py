"""find_safe_batch_size_isolated: crashes and hangs in a child process become "too big", errors come back.

Each child is a spawned Python that imports torch (a few seconds), so every case here is one search.
The targets live in tests/isolate_targets.py, which the children import by name.
"""

import functools
import multiprocessing
import pickle

import isolate_targets as targets
import pytest
import timm

from mps_autobatch import NoBatchSizeFits, find_safe_batch_size
from mps_autobatch.isolate import find_safe_batch_size_isolated
from mps_autobatch.simulate import simulated_backend

CPU = dict(device="cpu", memory_limit="1GiB")
# A callable that allocates nothing reads a flat peak on CPU (the process's resident set when probing
# began), so after two trials the search falls back to bisection: doubling from 2 to the first crash,
# then halving the bracket. Each child repeats the doubling up to 32, then fails the sizes that killed
# earlier children (without running them) and bisects on.
DOUBLING = [(2, "ok"), (4, "ok"), (8, "ok"), (16, "ok")]


def _sizes(result):
    return [(t.batch_size, t.outcome) for t in result.trials]


@pytest.mark.timeout(180)
def test_an_abort_marks_its_size_too_big_and_the_search_bisects_below_it():
    seen = []
    result = find_safe_batch_size_isolated(targets.aborting_step, on_trial=seen.append, **CPU)
    # Five children: aborts at 64, 48, 40 and 38; the last one verifies 36 and 37.
    assert _sizes(result) == [
        *DOUBLING, (32, "ok"), (64, "oom"),
        *DOUBLING, (32, "ok"), (48, "oom"),
        *DOUBLING, (32, "ok"), (40, "oom"),
        *DOUBLING, (32, "ok"), (36, "ok"), (38, "oom"),
        *DOUBLING, (32, "ok"), (36, "ok"), (37, "ok"),
    ]  # fmt: skip
    assert [t.error for t in result.trials if t.error] == [
        f"child process died (SIGABRT) at batch size {size}" for size in (64, 48, 40, 38)
    ]
    assert seen == list(result.trials)  # on_trial ran here for every trial, the crashes included
    # Bisection recommends 80% of the largest verified size (the default headroom): int(0.8 * 37).
    assert (result.max_batch_size, result.batch_size, result.strategy) == (37, 29, "bisect")
    assert result.note.endswith(
        "Batch size 38 and larger counted as out of memory: child process died (SIGABRT) at batch size 38."
    )


@pytest.mark.timeout(180)
def test_a_hang_is_killed_after_the_trial_timeout_and_counts_as_too_big():
    result = find_safe_batch_size_isolated(targets.hanging_step, trial_timeout_s=3, **CPU)
    # Five children: hangs at 32, 24, 22 and 21, each killed after 3 s.
    assert _sizes(result) == [
        *DOUBLING, (32, "oom"),
        *DOUBLING, (24, "oom"),
        *DOUBLING, (20, "ok"), (22, "oom"),
        *DOUBLING, (20, "ok"), (21, "oom"),
        *DOUBLING, (20, "ok"),
    ]  # fmt: skip
    assert [t.error for t in result.trials if t.error] == [
        f"child process did not finish batch size {size} within 3s (killed)" for size in (32, 24, 22, 21)
    ]
    assert (result.max_batch_size, result.batch_size) == (20, 16)  # int(0.8 * 20)


@pytest.mark.timeout(180)
def test_a_crash_at_the_smallest_size_raises_no_batch_size_fits():
    # multiple_of=2: the first size, 2, is the smallest allowed, so one crash leaves nothing to try.
    with pytest.raises(NoBatchSizeFits) as info:
        find_safe_batch_size_isolated(functools.partial(targets.aborting_step, 0), multiple_of=2, **CPU)
    assert str(info.value) == (
        "No batch size fits: child process died (SIGABRT) at batch size 2, the smallest size allowed. "
        "Use a smaller model or input, or run find_safe_batch_size in this process to see the failure."
    )
    assert [(t.batch_size, t.outcome) for t in info.value.trials] == [(2, "oom")]
    assert info.value.limit_bytes == 2**30


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        # A picklable exception comes back as itself.
        ("value", ValueError, "user bug"),
        # One that cannot be pickled comes back as its type name and message.
        ("locked", RuntimeError, "LockedError: holds a lock"),
        # An exit that is not a signal is no size's fault.
        ("exit", RuntimeError, "The probe's child process exited with code 3 and no result (batch size 2). "
         "Its output above says why."),
    ],
)  # fmt: skip
def test_an_error_in_the_child_is_raised_in_the_parent(kind, error, message):
    with pytest.raises(error) as info:
        find_safe_batch_size_isolated(functools.partial(targets.raising_step, kind), **CPU)
    assert str(info.value) == message
    if kind != "exit":  # the child's traceback is chained as the cause
        assert "isolate_targets.py" in str(info.value.__cause__)


@pytest.mark.timeout(180)
def test_what_cannot_be_pickled_fails_before_any_child_starts():
    with pytest.raises(TypeError, match="needs target_factory and every argument pickled") as info:
        find_safe_batch_size_isolated(lambda: targets.aborting_step(), **CPU)
    assert isinstance(info.value.__cause__, (pickle.PicklingError, AttributeError))


@pytest.mark.timeout(180)
def test_a_model_in_a_child_finds_what_the_search_finds_in_process():
    factory = functools.partial(timm.create_model, "test_efficientnet", num_classes=10)
    arguments = dict(memory_limit="256MiB", input_shape=(3, 32, 32))
    isolated = find_safe_batch_size_isolated(factory, device=simulated_backend("mps:16GiB"), **arguments)
    in_process = find_safe_batch_size(factory(), device=simulated_backend("mps:16GiB"), **arguments)
    assert isolated.batch_size == in_process.batch_size
    assert [t.batch_size for t in isolated.trials] == [t.batch_size for t in in_process.trials]
    assert isolated.strategy == in_process.strategy == "measure"


@pytest.mark.timeout(180)
def test_the_child_is_killed_when_the_parent_is_interrupted():
    def interrupt(trial):
        raise KeyboardInterrupt  # as Ctrl-C would, while the child goes on to hang at batch size 4

    with pytest.raises(KeyboardInterrupt):
        find_safe_batch_size_isolated(functools.partial(targets.hanging_step, 2), on_trial=interrupt, **CPU)
    assert multiprocessing.active_children() == []
