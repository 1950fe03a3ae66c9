"""Run the batch-size search in a child process, so a crash or a hang marks a size as too big.

Some Metal failures abort the process instead of raising an error (pytorch/pytorch#84039), and a step
that swaps or deadlocks never returns; in the user's process either takes the shell or notebook with it.
`find_safe_batch_size_isolated` runs `find_safe_batch_size` in a spawned child that tells the parent
which batch size starts and sends each `Trial` as it ends. When the child dies by a signal, or sends
nothing for ``trial_timeout_s`` while a size runs, that size is recorded as an "oom" trial and a new
child searches again, with that size and every larger one failing as out of memory without being run,
so the search keeps bisecting instead of stepping down one size per crash.

Messages, child to parent: ("limit", bytes), ("start", batch_size), ("trial", Trial),
("result", ProbeResult), ("no_fit", message, trials, limit_bytes, traceback) and
("error", exception or (type name, message), traceback).
"""

from __future__ import annotations

import dataclasses
import inspect
import multiprocessing
import pickle
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from time import perf_counter
from typing import Any

import torch
from torch import nn

from . import distributed
from ._units import parse_size
from .devices import get_backend
from .errors import NoBatchSizeFits
from .probe import find_safe_batch_size
from .results import ProbeResult, Trial

__all__ = ["find_safe_batch_size_isolated"]

# Seconds a child that sent its result may take to exit (torch's teardown) before it is killed.
_EXIT_GRACE_S = 30.0
# The search warms up, uncounted, at up to 2 samples (search._SMALL_START) before its first trial;
# a crash at or below that size is excluded with max_batch_size, since skipping the warm-up would fail it.
_WARM_UP_MAX = 2

Target = nn.Module | Callable[[int], object]


class _RemoteTraceback(Exception):
    """The child's traceback, chained as the cause of its re-raised exception (as concurrent.futures does)."""


# --- in the child ---------------------------------------------------------------------------------------
class _Reporter:
    """Tells the parent which batch size starts, forwards trials, and fails sizes that killed a child."""

    def __init__(self, conn: Connection, skip_from: int | None) -> None:
        self.conn = conn
        self.skip_from = skip_from
        self.skipped: set[int] = set()
        self.running: int | None = None

    def start(self, batch_size: int) -> None:
        if self.skip_from is not None and batch_size >= self.skip_from:
            self.skipped.add(batch_size)
            # MemoryError is out-of-memory to the search (oom.is_oom_error): it bisects below this size.
            raise MemoryError(f"batch size {batch_size} not run: batch size {self.skip_from} killed a child process")
        if batch_size != self.running:  # once per trial, not per step or per forward
            self.running = batch_size
            self.conn.send(("start", batch_size))

    def on_trial(self, trial: Trial) -> None:
        self.running = None
        if trial.batch_size not in self.skipped:
            self.conn.send(("trial", trial))

    def kept(self, trials: tuple[Trial, ...]) -> tuple[Trial, ...]:
        """The trials that really ran."""
        return tuple(t for t in trials if t.batch_size not in self.skipped)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        batch = args[0] if args else None
        if isinstance(batch, torch.Tensor) and batch.dim() > 0:
            self.start(int(batch.shape[0]))

    def watch(self, target: Target) -> Target:
        """The target, reporting each batch size before it runs."""
        if isinstance(target, nn.Module):
            target.register_forward_pre_hook(self._pre_hook)
            return target
        if not callable(target):
            return target  # find_safe_batch_size rejects it with its own message

        def step(batch_size: int) -> object:
            self.start(batch_size)
            return target(batch_size)

        return step


def _limit_bytes(kwargs: dict[str, Any]) -> int | None:
    """The limit the search will hold to, for a `NoBatchSizeFits` raised in the parent after a crash."""
    spec = kwargs.get("spec")
    memory_limit = spec.memory_limit if spec is not None else kwargs.get("memory_limit")
    try:
        backend = get_backend(kwargs.get("device", "auto"))
        return backend.limit(parse_size(memory_limit) if memory_limit is not None else None).bytes
    except (ValueError, TypeError):
        return None  # bad arguments: find_safe_batch_size raises them next, after its own checks


def _portable(exc: Exception) -> Exception | tuple[str, str]:
    """The exception if it survives pickling unchanged, else its type name and message."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:
        return type(exc).__name__, str(exc)
    return exc if type(copy) is type(exc) and str(copy) == str(exc) else (type(exc).__name__, str(exc))


def _child_main(conn: Connection, payload: bytes, skip_from: int | None) -> None:
    reporter = _Reporter(conn, skip_from)
    try:
        # Unpickled here, not by multiprocessing, so that an ImportError reaches the parent as one.
        factory, kwargs = pickle.loads(payload)
        target = reporter.watch(factory())
        limit = _limit_bytes(kwargs)
        if limit is not None:
            conn.send(("limit", limit))
        result = find_safe_batch_size(target, on_trial=reporter.on_trial, **kwargs)
        conn.send(("result", dataclasses.replace(result, trials=reporter.kept(result.trials))))
    except NoBatchSizeFits as exc:  # its keyword-only fields do not survive pickling: send them apart
        conn.send(("no_fit", str(exc), reporter.kept(exc.trials), exc.limit_bytes, traceback.format_exc()))
    except Exception as exc:
        conn.send(("error", _portable(exc), traceback.format_exc()))
    finally:
        conn.close()


# --- in the parent --------------------------------------------------------------------------------------
@dataclass
class _ChildEnd:
    """What one child did: its trials, and either its result or the trial it died in."""

    trials: list[Trial] = field(default_factory=list)
    limit_bytes: int | None = None
    running: int | None = None
    result: ProbeResult | None = None
    crash: Trial | None = None


def _crash_trial(batch_size: int, error: str) -> Trial:
    return Trial(batch_size, "oom", None, None, None, None, fits_budget=False, error=error)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _after_exit(process: BaseProcess, end: _ChildEnd) -> Trial:
    """The crash trial for a child that died by a signal inside a trial; RuntimeError for any other end."""
    process.join()
    code = process.exitcode
    where = f"batch size {end.running}" if end.running is not None else f"between trials, after {len(end.trials)}"
    if code is not None and code < 0:
        if end.running is not None:
            return _crash_trial(end.running, f"child process died ({_signal_name(-code)}) at batch size {end.running}")
        raise RuntimeError(
            f"The probe's child process died ({_signal_name(-code)}) {where}, outside any trial. "
            "Run find_safe_batch_size in this process to see the failure."
        )
    raise RuntimeError(
        f"The probe's child process exited with code {code} and no result ({where}). Its output above says why."
    )


def _rebuild(payload: Exception | tuple[str, str]) -> Exception:
    if isinstance(payload, Exception):
        return payload
    name, message = payload
    return RuntimeError(f"{name}: {message}")


def _handle(message: tuple[Any, ...], end: _ChildEnd, earlier: tuple[Trial, ...], on_trial: Any) -> None:
    kind = message[0]
    if kind == "start":
        end.running = message[1]
    elif kind == "limit":
        end.limit_bytes = message[1]
    elif kind == "trial":
        end.trials.append(message[1])
        end.running = None
        if on_trial is not None:
            on_trial(message[1])
    elif kind == "result":
        end.result = message[1]
    elif kind == "no_fit":
        _, text, trials, limit_bytes, remote = message
        raise NoBatchSizeFits(text, trials=earlier + trials, limit_bytes=limit_bytes) from _RemoteTraceback(remote)
    elif kind == "error":
        raise _rebuild(message[1]) from _RemoteTraceback(message[2])
    else:
        raise RuntimeError(f"Unknown message {kind!r} from the probe's child process.")


def _stop(process: BaseProcess, graceful: bool) -> None:
    if graceful:
        process.join(_EXIT_GRACE_S)
    if process.is_alive():
        process.kill()
    process.join()
    process.close()  # its pipe and sentinel, now rather than at garbage collection


def _run_child(
    payload: bytes,
    skip_from: int | None,
    trial_timeout_s: float,
    on_trial: Callable[[Trial], None] | None,
    earlier: tuple[Trial, ...],
) -> _ChildEnd:
    """Run one child to its result or its crash; re-raise what it raised. The child never outlives this."""
    # Never fork: a forked child inherits torch's thread pools and Metal/CUDA state half-initialised.
    context = multiprocessing.get_context("spawn")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(writer, payload, skip_from), name="mps-autobatch-probe")
    process.start()
    end = _ChildEnd()
    try:
        writer.close()  # else the parent holds the child's end open and never sees EOF when it dies
        while end.result is None and end.crash is None:
            running = end.running
            # Startup (imports, building the model) and the work between trials have no time limit.
            ready = wait([reader, process.sentinel], trial_timeout_s if running is not None else None)
            if not ready and running is not None:
                process.kill()
                error = f"child process did not finish batch size {running} within {trial_timeout_s:g}s (killed)"
                end.crash = _crash_trial(running, error)
                continue
            try:
                if not reader.poll():
                    raise EOFError  # exited with nothing left to read
                message = reader.recv()
            except EOFError:
                end.crash = _after_exit(process, end)
                continue
            _handle(message, end, earlier, on_trial)
    finally:
        _stop(process, graceful=end.result is not None)
        reader.close()
    return end


def _check(target_factory: object, trial_timeout_s: object, kwargs: dict[str, Any]) -> None:
    if not callable(target_factory):
        raise TypeError(f"target_factory must be callable, got {target_factory!r}. Pass e.g. a module-level function.")
    if isinstance(trial_timeout_s, bool) or not isinstance(trial_timeout_s, (int, float)) or trial_timeout_s <= 0:
        raise ValueError(
            f"trial_timeout_s must be a number of seconds > 0, got {trial_timeout_s!r}. The default is 600."
        )
    inspect.signature(find_safe_batch_size).bind(None, **kwargs)  # a misspelt keyword fails here, not in a child


def _payload(target_factory: Callable[[], Target], kwargs: dict[str, Any]) -> bytes:
    try:
        return pickle.dumps((target_factory, kwargs))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(
            f"The child process needs target_factory and every argument pickled, and this fails: {exc}. "
            "Pass a module-level function or functools.partial of one, and device as a string."
        ) from exc


def _child_kwargs(kwargs: dict[str, Any], skip_from: int | None) -> dict[str, Any]:
    if skip_from is None or skip_from > _WARM_UP_MAX:
        return kwargs
    cap = skip_from - 1
    spec = kwargs.get("spec")
    user_max = spec.max_batch_size if spec is not None else kwargs.get("max_batch_size")
    capped = cap if user_max is None else min(user_max, cap)
    if spec is not None:
        return {**kwargs, "spec": dataclasses.replace(spec, max_batch_size=capped)}
    return {**kwargs, "max_batch_size": capped}


def _finish(result: ProbeResult, earlier: list[Trial], crash: Trial | None, began: float) -> ProbeResult:
    note = result.note
    if crash is not None:
        note = f"{note} " if note else ""
        note += f"Batch size {crash.batch_size} and larger counted as out of memory: {crash.error}."
    return dataclasses.replace(result, trials=(*earlier, *result.trials), note=note, elapsed_s=perf_counter() - began)


def find_safe_batch_size_isolated(
    target_factory: Callable[[], Target],
    *,
    trial_timeout_s: float = 600.0,
    **kwargs: Any,
) -> ProbeResult:
    """`find_safe_batch_size` in a child process: a Metal abort or a hang marks a size too big, not the shell.

    Some Metal failures abort the process outright (pytorch/pytorch#84039). Here the search runs in a
    spawned child; when the child dies by a signal, or a trial sends nothing for ``trial_timeout_s``,
    the size it was running is recorded as an "oom" `Trial` and a fresh child searches again, failing
    that size and every larger one without running them. Only a signal or a timeout counts as too big:
    an exception in the child is raised here. As with any spawn, a script must call this under
    ``if __name__ == "__main__":``.

    Args:
        target_factory: builds the target in the child: a module-level function, or e.g.
            ``functools.partial(timm.create_model, "resnet50", num_classes=101)``; it must pickle.
        trial_timeout_s: seconds a started batch size may run without a result before the child is
            killed and the size counts as too big. Starting the child and building the model are not
            limited.
        **kwargs: `find_safe_batch_size`'s keyword arguments, picklable (``device`` as a string or a
            backend object such as ``simulated_backend("mps:16GiB")``); ``on_trial`` is called here,
            in this process, with every trial, the crashes included.

    Returns:
        The last child's `ProbeResult`, its ``trials`` preceded by every earlier child's trials and
        crash trials in order, ``elapsed_s`` the whole wall time.

    Raises:
        NoBatchSizeFits: the smallest size allowed crashed the child, or ran out of memory.
        TypeError: ``target_factory`` or an argument cannot be pickled, or an unknown keyword.
        RuntimeError: the child exited without a result and not by a signal inside a trial, or raised
            an exception that cannot be pickled (its type name and message are kept).
        Exception: whatever the child raised, with the same type and message.

    Example:
        >>> import functools, torch
        >>> from mps_autobatch.simulate import simulated_backend
        >>> factory = functools.partial(torch.nn.Linear, 32, 10)
        >>> result = find_safe_batch_size_isolated(factory, input_shape=(32,), num_classes=10,
        ...     device=simulated_backend("mps:16GiB"), memory_limit="256MiB", max_batch_size=4096)
        >>> result.max_batch_size, [t.outcome for t in result.trials][-1]
        (4096, 'ok')
    """
    try:
        result = _search_in_children(target_factory, trial_timeout_s, kwargs)
    except Exception as exc:
        distributed.share_failure(exc)  # under torchrun, the other ranks stop with it
        raise
    return distributed.agree_on_probe(result)


def _search_in_children(
    target_factory: Callable[[], Target], trial_timeout_s: float, kwargs: dict[str, Any]
) -> ProbeResult:
    on_trial: Callable[[Trial], None] | None = kwargs.pop("on_trial", None)
    _check(target_factory, trial_timeout_s, kwargs)
    multiple_of = kwargs["spec"].multiple_of if "spec" in kwargs else kwargs.get("multiple_of", 1)
    began = perf_counter()
    earlier: list[Trial] = []
    crash: Trial | None = None  # the smallest size that killed a child so far
    limit_bytes: int | None = None
    while True:
        skip_from = crash.batch_size if crash is not None else None
        payload = _payload(target_factory, _child_kwargs(kwargs, skip_from))
        end = _run_child(payload, skip_from, float(trial_timeout_s), on_trial, tuple(earlier))
        limit_bytes = end.limit_bytes if end.limit_bytes is not None else limit_bytes
        if end.result is not None:
            return _finish(end.result, earlier, crash, began)
        crash = end.crash
        assert crash is not None  # _run_child returns a result or a crash, or raises
        earlier += [*end.trials, crash]
        if on_trial is not None:
            on_trial(crash)
        if crash.batch_size <= multiple_of:
            raise NoBatchSizeFits(
                f"No batch size fits: {crash.error}, the smallest size allowed. Use a smaller model or input, "
                "or run find_safe_batch_size in this process to see the failure.",
                trials=tuple(earlier),
                limit_bytes=limit_bytes or 0,  # 0: the child died before it could read the limit
            )
