"""A simulated Apple-silicon accelerator: the MPS memory API and its errors, with compute on the CPU.

Every tensor storage the code under `SimulatedMPS.tracking` creates is booked as a device buffer (of
tensors made before, only what lives on a device: parameters and what an op writes in place, such as
BatchNorm statistics and optimizer state; host data a step only reads is not device memory) by a
caching allocator modelled on PyTorch's MPSAllocator (aten/src/ATen/mps/MPSAllocator.{h,mm}): sizes
are rounded up (small buffers to pages, large ones to 2 MiB), freed buffers go to a cache and are
reused, driver memory = heaps (live + cached) + other allocations (Metal, MPSGraph), the limit
(ratio x recommended max) is checked against driver memory, and the cache is flushed once before the
exact MPS out-of-memory RuntimeError is raised. A CUDA-text mode raises ``torch.OutOfMemoryError``
instead, for peers that only recognise CUDA errors.

The constants are parameters (`AllocatorModel`): a search that is right here must stay right when
rounding, caching or other allocations behave differently.

Example:
    >>> import torch
    >>> sim = SimulatedMPS(memory_bytes=16 * 2**30)
    >>> with sim.tracking():
    ...     x = torch.ones(1024, 1024)          # 4 MiB of tensor
    >>> sim.current_allocated_memory() // 2**20
    4
    >>> del x; sim.current_allocated_memory(), sim.driver_allocated_memory() >= 4 * 2**20  # cached
    (0, True)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import psutil
import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._tracking import StorageBook
from ._units import format_bytes, parse_size
from .allocator import MPS_ALLOCATOR, AllocatorModel, Buffer, CachingAllocator
from .devices import (
    MPS_DEFAULT_HIGH_WATERMARK_RATIO,
    MPS_WATERMARK_ENV,
    MPSBackend,
)

__all__ = ["ALLOCATOR_VARIANTS", "AllocatorModel", "SimulatedMPS", "SimulatedMPSBackend", "simulated_backend"]

KiB, MiB, GiB = 2**10, 2**20, 2**30


ALLOCATOR_VARIANTS: dict[str, AllocatorModel] = {
    "default": AllocatorModel(),
    "best-fit-2x": AllocatorModel(reuse="best_fit_2x"),
    "pow2-heaps": AllocatorModel(large_rounding="power_of_two"),
    "graph-per-shape": AllocatorModel(graph_bytes_per_shape=64 * KiB),
    "flush-at-90": AllocatorModel(flush_at=0.9),
}
"""The allocator variants by name, (a) to (e): today's model; best-fit reuse up to 2x; power-of-two heaps; other
allocations that grow with each distinct input shape; a cache flush past 90 % of the limit. ``--simulate
mps:16GiB:pow2-heaps`` picks one; ``mps:16GiB`` is "default"."""


def _mps_format_size(size: int, units: Literal["GiB", "GB"]) -> str:
    # MPSHeapAllocatorImpl::format_size: two decimals; GiB/MiB/KiB from torch 2.8, GB/MB/KB before.
    suffix = {"GiB": ("KiB", "MiB", "GiB"), "GB": ("KB", "MB", "GB")}[units]
    if size <= 1024:
        return f"{size} bytes"
    if size <= 1024**2:
        return f"{size / 1024:.2f} {suffix[0]}"
    if size <= 1024**3:
        return f"{size / 1024**2:.2f} {suffix[1]}"
    return f"{size / 1024**3:.2f} {suffix[2]}"


class _Accelerator:
    """Stands in for ``torch.accelerator`` on a Mac: peak statistics exist from torch 2.13 only."""

    def __init__(self, sim: SimulatedMPS) -> None:
        self._sim = sim

    def is_available(self) -> bool:
        return True

    def current_accelerator(self, check_available: bool = False) -> torch.device:
        return torch.device("mps")

    def _check(self) -> None:
        if not self._sim.peak_stats:
            raise RuntimeError("Allocator for mps is not a DeviceAllocator")

    def memory_allocated(self, device_index: object = None, /) -> int:
        self._check()
        return self._sim.current_allocated_memory()

    def max_memory_allocated(self, device_index: object = None, /) -> int:
        self._check()
        return self._sim._peak_live

    def reset_peak_memory_stats(self, device_index: object = None, /) -> None:
        self._check()
        self._sim._peak_live = self._sim.current_allocated_memory()


class SimulatedMPS:
    """A Mac's GPU memory, simulated: use it where the code would use ``torch.mps``.

    Args:
        memory_bytes: the Mac's unified memory.
        recommended_max_bytes: Metal's recommendedMaxWorkingSetSize; by default 2/3 of memory up to
            32 GiB and 3/4 above (REFERENCE.md B).
        system_used_bytes: RAM used by everything else on the Mac (default a quarter of it).
        allocator: the allocator's constants.
        error_style: "mps" raises the MPS RuntimeError text; "cuda" raises ``torch.OutOfMemoryError``
            with the CUDA text.
        peak_stats: whether ``torch.accelerator`` peak statistics work (torch >= 2.13).
        units: "GiB" for the error texts of torch >= 2.8, "GB" for older ones.
    """

    def __init__(
        self,
        memory_bytes: int = 16 * GiB,
        *,
        recommended_max_bytes: int | None = None,
        system_used_bytes: int | None = None,
        allocator: AllocatorModel = MPS_ALLOCATOR,
        error_style: Literal["mps", "cuda"] = "mps",
        peak_stats: bool = True,
        units: Literal["GiB", "GB"] = "GiB",
    ) -> None:
        share = 2 / 3 if memory_bytes <= 32 * GiB else 3 / 4
        self.memory_bytes = memory_bytes
        self.recommended_max_bytes = recommended_max_bytes or int(memory_bytes * share)
        self.system_used_bytes = memory_bytes // 4 if system_used_bytes is None else system_used_bytes
        self.allocator = allocator
        self.error_style = error_style
        self.peak_stats = peak_stats
        self.units = units
        self.accelerator = _Accelerator(self)
        # Like the real allocator, the environment is read once (at its first use in torch; here, now);
        # strtod reads an unparsable value as 0.0, which disables the limit.
        raw = os.environ.get(MPS_WATERMARK_ENV)
        self._ratio = MPS_DEFAULT_HIGH_WATERMARK_RATIO if raw is None else _strtod(raw)
        self._books = CachingAllocator(allocator)
        self._peak_live = 0
        self._graph_bytes = 0
        self._shapes: set[tuple[object, ...]] = set()
        self._book: StorageBook | None = None
        # Every storage booked on this device, across sessions: a buffer is allocated once, as on a real device.
        self._booked: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._high_water = 0
        self.oom_count = 0
        self.flushes = 0  # cache releases the allocator made on its own, under pressure

    # --- the torch.mps API ---------------------------------------------------------------------------
    def current_allocated_memory(self) -> int:
        """Bytes of live buffers (rounded), like ``torch.mps.current_allocated_memory``."""
        return self._books.live_bytes

    def driver_allocated_memory(self) -> int:
        """Heaps (live and cached buffers) plus other allocations, like ``torch.mps.driver_allocated_memory``."""
        return self._books.heap_bytes + self.allocator.other_bytes + self._graph_bytes

    def recommended_max_memory(self) -> int:
        return self.recommended_max_bytes

    def set_per_process_memory_fraction(self, fraction: float) -> None:
        # The checks and texts of torch/mps/__init__.py.
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 2:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~2")
        self._ratio = fraction

    def empty_cache(self) -> None:
        self._books.empty_cache()

    def synchronize(self) -> None:
        """Compute is synchronous on the CPU: nothing to wait for."""

    def is_available(self) -> bool:
        return True

    # --- what a test or benchmark reads ----------------------------------------------------------------
    @property
    def ratio(self) -> float:
        """The high-watermark ratio now in force (torch offers no getter; tests need one)."""
        return self._ratio

    @property
    def high_water_bytes(self) -> int:
        """The true high point of driver memory since `reset_high_water`, at every allocation (what a reading
        taken between ops can miss)."""
        return self._high_water

    def reset_high_water(self) -> None:
        self._high_water = self.driver_allocated_memory()

    @property
    def limit_bytes(self) -> int | None:
        """The driver-memory limit now in force, None when disabled (ratio 0.0)."""
        return int(self._ratio * self.recommended_max_bytes) if self._ratio > 0 else None

    def __getstate__(self) -> dict[str, object]:
        # The child of an isolated probe gets the device as it is, without the bookings of this process's storages.
        return {**self.__dict__, "_booked": None, "_book": None}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._booked = WeakIdKeyDictionary()

    def host_memory(self) -> tuple[int, int]:
        """(total, available) RAM of the simulated Mac, with this process's driver memory in use."""
        used = self.system_used_bytes + self.driver_allocated_memory()
        return self.memory_bytes, max(self.memory_bytes - used, 0)

    @contextmanager
    def tracking(self) -> Iterator[SimulatedMPS]:
        """Book the tensors the block creates or touches as buffers on this device."""
        if self._book is not None:
            yield self
            return
        self._book = _GraphAwareBook(self)
        try:
            with self._book:
                yield self
        finally:
            self._book = None

    # --- the allocator ---------------------------------------------------------------------------------
    def _over_limit(self, size: int, fraction: float = 1.0) -> bool:
        limit = self.limit_bytes
        return limit is not None and self.driver_allocated_memory() + size > fraction * limit

    def _allocate(self, nbytes: int) -> Buffer:
        books = self._books
        size = books.size_class(nbytes)
        buffer = None if self._over_limit(size) else books.take_cached(size)
        if buffer is None:
            if (
                self._over_limit(size, self.allocator.flush_at)
                or self.driver_allocated_memory() + size > self.memory_bytes
            ):
                if books.cached_bytes:
                    self.flushes += 1
                self.empty_cache()  # MPSAllocator releases its cached buffers before growing past the limit
            if self._over_limit(size) or self.driver_allocated_memory() + size > self.memory_bytes:
                self.oom_count += 1
                raise self._out_of_memory(size, nbytes)
            buffer = books.grow(size)
        self._peak_live = max(self._peak_live, books.live_bytes)
        self._high_water = max(self._high_water, self.driver_allocated_memory())
        return buffer

    def _release(self, buffer: object) -> None:
        assert isinstance(buffer, Buffer)
        self._books.release(buffer)

    def _see_op(self, func: object, args: tuple[object, ...]) -> None:
        if not self.allocator.graph_bytes_per_shape:
            return
        key = (func, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        if key not in self._shapes:
            self._shapes.add(key)
            self._graph_bytes += self.allocator.graph_bytes_per_shape

    def _out_of_memory(self, size: int, nbytes: int) -> Exception:
        fmt = lambda n: _mps_format_size(n, self.units)  # noqa: E731
        pool = "shared" if nbytes <= 8 else "private"
        heaps, live, driver = self._books.heap_bytes, self._books.live_bytes, self.driver_allocated_memory()
        if self.error_style == "cuda":
            free = max(self.memory_bytes - driver, 0)
            return torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {fmt(size)}. GPU 0 has a total capacity of "
                f"{fmt(self.limit_bytes or self.memory_bytes)} of which {fmt(free)} is free. Including "
                f"non-PyTorch memory, this process has {fmt(driver)} memory in use. Of the allocated memory "
                f"{fmt(live)} is allocated by PyTorch, and {fmt(heaps - live)} is reserved by "
                "PyTorch but unallocated."
            )
        if self.limit_bytes is None:
            return RuntimeError(
                f"MPS backend out of memory (MPS allocated: {fmt(heaps)}, other allocations: "
                f"{fmt(driver - heaps)}). Tried to allocate {fmt(size)} on {pool} pool."
            )
        return RuntimeError(
            f"MPS backend out of memory (MPS allocated: {fmt(heaps)}, other allocations: {fmt(driver - heaps)}, "
            f"max allowed: {fmt(self.limit_bytes)}). Tried to allocate {fmt(size)} on {pool} pool. Use "
            "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations (may cause "
            "system failure)."
        )


def _strtod(raw: str) -> float:
    match = re.match(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", raw)
    return float(match.group(0)) if match else 0.0


class _GraphAwareBook(StorageBook):
    def __init__(self, sim: SimulatedMPS) -> None:
        super().__init__(sim._allocate, sim._release, adopt_inputs="resident", seen=sim._booked)
        self._sim = sim
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> _GraphAwareBook:
        # A module that runs lives on the device: its parameters and buffers (BatchNorm's running statistics,
        # which native_batch_norm updates without saying so in its schema, or a constant table it only reads).
        def on_device(module: torch.nn.Module, *_: object) -> None:
            self.mark_resident([*module.parameters(recurse=False), *module.buffers(recurse=False)])

        self._hook = torch.nn.modules.module.register_module_forward_pre_hook(on_device)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sim._see_op(func, args)
        return super().__torch_dispatch__(func, types, args, kwargs)


class SimulatedMPSBackend(MPSBackend):
    """The MPS backend reading a `SimulatedMPS`: what tests, benchmarks and ``--simulate`` probe.

    Compute is real, so a session's limit must fit in this machine's available RAM; describing the
    simulated Mac (its limit, ``autobatch info``) does not need it.
    """

    aborts_on_failure = False  # a simulated Metal failure raises; nothing aborts the process
    collectives = "gloo"  # its tensors are CPU tensors

    def __init__(self, sim: SimulatedMPS) -> None:
        super().__init__(sim, sim.accelerator, device="cpu", host_memory=sim.host_memory, name="sim-mps")
        self.sim = sim

    def identity(self) -> str:
        sim = self.sim
        return f"sim-mps:{sim.memory_bytes}:{sim.recommended_max_bytes}:{sim.error_style}:{sim.allocator}"

    def choose_amp(self, setting: str) -> str | None:
        """As on a Mac, but bf16 always runs (autocast on this CPU) and "auto" stays fp32, as it did on a CPU."""
        if setting == "fp16":
            return super().choose_amp(setting)  # refused, with the Mac's reason
        return None if setting in ("auto", "off") else setting

    def check_can_run(self, limit_bytes: int) -> None:
        # Describing the simulated Mac needs no RAM; running steps up to its limit does.
        available = psutil.virtual_memory().available
        if limit_bytes > available:
            raise ValueError(
                f"The simulated limit {format_bytes(limit_bytes)} is more than this machine's "
                f"{format_bytes(available)} of available RAM, and simulated compute is real. "
                "Simulate a smaller Mac or pass a smaller memory limit."
            )

    @contextmanager
    def session(self, limit_bytes: int) -> Iterator[None]:
        with self.sim.tracking(), super().session(limit_bytes):
            yield


_SPEC = re.compile(r"^(mps|mps-cuda-text):([^:]+)(?::(.+))?$")


def simulated_backend(spec: str) -> SimulatedMPSBackend:
    """A simulated Mac from a spec such as ``"mps:16GiB"`` (``"mps-cuda-text:16GiB"`` raises CUDA texts).

    A third part names the allocator variant (`ALLOCATOR_VARIANTS`): ``"mps:16GiB:pow2-heaps"``.

    Example:
        >>> backend = simulated_backend("mps:16GiB")
        >>> round(backend.sim.recommended_max_memory() / 2**30, 2)   # 2/3 of a 16 GiB Mac
        10.67
        >>> simulated_backend("mps:8GiB:flush-at-90").sim.allocator.flush_at
        0.9
    """
    match = _SPEC.match(spec.strip())
    if match is None:
        raise ValueError(f"Cannot read the simulation {spec!r}. Write it as 'mps:16GiB' (a Mac with 16 GiB).")
    style: Literal["mps", "cuda"] = "cuda" if match.group(1) == "mps-cuda-text" else "mps"
    variant = match.group(3) or "default"
    if variant not in ALLOCATOR_VARIANTS:
        raise ValueError(
            f"Unknown allocator variant {variant!r} in the simulation {spec!r}. Use one of: "
            f"{', '.join(ALLOCATOR_VARIANTS)}."
        )
    memory = parse_size(match.group(2))
    return SimulatedMPSBackend(SimulatedMPS(memory, error_style=style, allocator=ALLOCATOR_VARIANTS[variant]))
