"""One memory backend per device kind: the limit, the peak over a window of work, the cleanup, the cap.

This is the only module that calls ``torch.mps`` / ``torch.cuda`` memory functions. The MPS backend
reads the modules it is given (default ``torch.mps`` and ``torch.accelerator``), which is how the
simulated accelerator (`mps_autobatch.simulate`) stands in for a Mac in tests and benchmarks.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._tracking import StorageBook
from ._units import format_bytes
from .allocator import MPS_ALLOCATOR, AllocatorModel

__all__ = [
    "BACKENDS",
    "CPUBackend",
    "CUDABackend",
    "MPSBackend",
    "MemoryBackend",
    "MemoryLimit",
    "PeakWindow",
    "available_devices",
    "get_backend",
]

GiB = 2**30
# torch's defaults (aten/src/ATen/mps/MPSAllocator.h): the high watermark caps driver memory at
# ratio x recommendedMaxWorkingSetSize; 2.0 is the largest ratio it accepts, 0.0 means unlimited.
MPS_DEFAULT_HIGH_WATERMARK_RATIO = 1.7
MPS_MAX_HIGH_WATERMARK_RATIO = 2.0
MPS_WATERMARK_ENV = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
CPU_DEFAULT_LIMIT_BYTES = 4 * GiB

HostMemory = Callable[[], tuple[int, int]]


def _host_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine's RAM."""
    memory = psutil.virtual_memory()
    return memory.total, memory.available


@dataclass(frozen=True)
class MemoryLimit:
    """A memory limit in bytes and, in words, where it came from."""

    bytes: int
    source: str


@dataclass
class PeakWindow:
    """Filled in when a `MemoryBackend.measure` block ends without an exception.

    Attributes:
        peak_bytes: the highest reading of the counter the limit applies to; None if it read 0 or nothing.
        allocated_bytes: the highest live-tensor reading; None if unknown.
        flushed: the allocator released its cache inside the block on its own (it reached its limit or its
            memory-pressure mark), so the block's high point is higher than any reading of it.
    """

    peak_bytes: int | None = None
    allocated_bytes: int | None = None
    flushed: bool = False


class _EveryOp(TorchDispatchMode):
    """Calls ``sample`` before and after every op: the allocator books a buffer when an op is dispatched, not
    when the device runs it, so the readings need no synchronize and catch the high point to within one op."""

    def __init__(self, sample: Callable[[], None]) -> None:
        super().__init__()
        self._sample = sample

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sample()
        out = func(*args, **(kwargs or {}))
        self._sample()
        return out


def _mps_bf16_supported() -> bool:
    # Autocast on MPS arrived in torch 2.5; bf16 on the GPU needs macOS 14 (REFERENCE.md B).
    torch_version = tuple(int(part) for part in torch.__version__.split(".")[:2])
    mac = platform.mac_ver()[0]
    return torch_version >= (2, 5) and bool(mac) and int(mac.split(".")[0]) >= 14


def _check_fits(memory_limit: int, total: int, whose: str, what: str) -> None:
    """The one check of an explicit limit against the memory the device has."""
    if memory_limit > total:
        of = f" {what}" if what else ""
        raise ValueError(
            f"memory_limit {format_bytes(memory_limit)} is more than {whose} {format_bytes(total)}{of}. "
            "Pass a smaller memory limit."
        )


def _positive(value: int | float | None) -> int | None:
    # A counter that reads 0 around real work measured nothing (REFERENCE.md C: torch.accelerator
    # returns 0 on a CUDA build without a GPU); never treat it as a measurement.
    return int(value) if value else None


class MemoryBackend(ABC):
    """What the search needs from a device: a limit, peak readings, cleanup, and a cap while probing.

    Subclasses set ``name`` and ``device`` and implement the abstract methods.
    """

    name: str = "base"
    device: torch.device = torch.device("cpu")
    shares_host_memory: bool = False
    """Its memory is the host's RAM, which every process on the host draws from (CPU, a Mac)."""
    keeps_cap_while_training: bool = False
    """Training must stay inside `session`: without the probe's cap an oversized step swaps instead of raising."""
    empty_cache_every: int = 0
    """How often (in optimizer updates) a trainer releases the allocator's cache by default; 0 never."""
    pins_memory: bool = False
    """DataLoader ``pin_memory`` helps host-to-device copies here."""
    prefers_channels_last: bool = False
    """Convolutions run faster in the channels-last memory format here (REFERENCE.md B: not on MPS)."""
    uses_grad_scaler: bool = False
    """fp16 autocast needs a GradScaler here (CUDA; on MPS it has had bugs, REFERENCE.md B)."""
    aborts_on_failure: bool = False
    """Some failures abort the process instead of raising (Metal, pytorch#84039): probe in a child by default."""
    syncs_batchnorm: bool = False
    """torch's SyncBatchNorm runs here (CUDA GPUs only)."""
    collectives: str | None = "gloo"
    """The torch.distributed backend that reduces this device's tensors (None: none can, as on MPS)."""
    allocator_rules: AllocatorModel | None = None
    """The caching allocator's rules a dry run replays to model this device (`mps_autobatch.allocator`); None:
    no model of them (the CPU counts tensors exactly; CUDA's block-splitting allocator is not modelled)."""

    def check_can_run(self, limit_bytes: int) -> None:  # noqa: B027 - a real device runs what fits its limit
        """Raise a one-line `ValueError` when steps up to ``limit_bytes`` cannot run here (a simulated Mac's RAM)."""

    def for_local_rank(self, local_rank: int) -> MemoryBackend:
        """The backend for torchrun's rank ``local_rank`` on this host (its own GPU); most devices are shared."""
        return self

    @staticmethod
    def is_available() -> bool:
        """Whether this kind of device can be used in this process."""
        return False

    @abstractmethod
    def limit(self, memory_limit: int | None = None) -> MemoryLimit:
        """The limit the whole process's memory on this device is held to."""

    def identity(self) -> str:
        """What distinguishes this device's memory behaviour from another's (for caching answers)."""
        return self.name

    @abstractmethod
    def in_use_bytes(self) -> int:
        """What this process holds on the device now, in the counter the limit applies to."""

    @contextmanager
    def session(self, limit_bytes: int) -> Iterator[None]:
        """Hold the process to ``limit_bytes`` while probing, and undo it afterwards."""
        yield

    @abstractmethod
    def measure(self) -> AbstractContextManager[PeakWindow]:
        """Measure the peak of the block; the window is filled in when the block ends normally."""

    def synchronize(self) -> None:  # noqa: B027 - a no-op by default: the CPU has no queue
        """Wait for queued device work, so clocks and counters are read after it."""

    def clear_cache(self) -> None:  # noqa: B027 - a no-op by default: the CPU has no allocator cache
        """Release the allocator's idle cached memory (and reset peak statistics where kept).

        No garbage collection here: a full collection costs 0.2 s in a process that has imported timm,
        and a step's tensors are freed by reference counting. `release_failed_step` collects.
        """

    def settle(self) -> None:
        """Before anything is measured: collect what earlier work left in reference cycles, empty the cache."""
        gc.collect()
        self.clear_cache()

    def release_failed_step(self) -> None:
        """Free what a failed step left on this device, after the workload undid its own part.

        When a backward pass fails, the graph's other ready tasks stay in the autograd engine's queue for
        this device, holding the failed step's activations, until the next backward runs there (measured on
        the simulation: a failed ResNet step kept 58 MiB alive through every later trial); a trivial
        backward drains the queue. Reference cycles through the failed step's frames can still hold
        tensors: a full collection frees them. Then the cache is emptied.
        """
        gc.collect()
        self.clear_cache()  # first, so the drain's scalar has room
        with torch.inference_mode(False), torch.enable_grad():  # also when called from an evaluation loop
            leaf = torch.zeros((), device=self.device, requires_grad=True)
            (leaf * 1.0).backward()
        self.clear_cache()

    def choose_amp(self, setting: str) -> str | None:
        """The autocast dtype ("bf16", "fp16" or None for fp32) for an ``--amp`` setting on this device.

        "auto" is full precision on the CPU; "bf16" runs there (autocast on the CPU), "fp16" does not.

        Raises:
            ValueError: the device cannot run the requested precision.
        """
        if setting == "fp16":
            raise ValueError("amp 'fp16' is for CUDA GPUs. On the CPU use 'bf16' or 'off'.")
        return None if setting in ("auto", "off") else setting

    def describe(self) -> list[tuple[str, str]]:
        """(name, value) rows that say what this device is, for ``autobatch info``."""
        return [("device", self.name)]


class MPSBackend(MemoryBackend):
    """Apple-silicon GPUs through the Metal allocator.

    The limit is ``ratio x recommended_max_memory()``, checked by the allocator against *driver*
    memory (tensors, its cache and MPSGraph's own allocations), and never more than RAM can hold now.
    While probing, the backend sets ``set_per_process_memory_fraction`` so an overshoot raises an error
    instead of swapping; afterwards it restores the ratio from PYTORCH_MPS_HIGH_WATERMARK_RATIO or the
    1.7 default (torch has no getter, so a ratio set by other code before the probe is not restored).

    Args:
        mps: the module to read (``torch.mps``; the simulation in tests).
        accelerator: the module for peak statistics (``torch.accelerator``, torch >= 2.13), or None.
        device: where tensors go (``"mps"``; ``"cpu"`` for the simulation).
        host_memory: returns (total, available) RAM; unified memory is RAM on a Mac.
        name: how results name the device.
    """

    name = "mps"
    shares_host_memory = True
    keeps_cap_while_training = True
    aborts_on_failure = True
    collectives: str | None = None  # gloo and nccl reduce no MPS tensors
    empty_cache_every = 10  # the seed's cadence: torch.mps.empty_cache() every 10 batches (REFERENCE.md A)
    allocator_rules = MPS_ALLOCATOR

    def __init__(
        self,
        mps: Any = None,
        accelerator: Any = None,
        *,
        device: str = "mps",
        host_memory: HostMemory = _host_memory,
        name: str = "mps",
    ) -> None:
        self._mps = mps if mps is not None else torch.mps
        self._accelerator: Any = accelerator if accelerator is not None else getattr(torch, "accelerator", None)
        self._host_memory = host_memory
        self.device = torch.device(device)
        self.name = name
        self._peak_stats: bool | None = None
        self._fraction: float | None = None  # the fraction an open session set (torch has no getter)

    @staticmethod
    def is_available() -> bool:
        return torch.backends.mps.is_available()

    def choose_amp(self, setting: str) -> str | None:
        """bf16 where torch (>= 2.5) and macOS (14+) support it, fp32 otherwise; fp16 is refused (GradScaler bugs)."""
        if setting == "off":
            return None
        supported = _mps_bf16_supported()
        if setting == "auto":
            return "bf16" if supported else None
        if setting == "fp16":
            raise ValueError("amp 'fp16' needs a GradScaler, which has had bugs on MPS. Use 'bf16' or 'off'.")
        if not supported:
            raise ValueError("amp 'bf16' on MPS needs torch >= 2.5 and macOS 14 or later. Use 'off'.")
        return setting

    def describe(self) -> list[tuple[str, str]]:
        recommended, source = self.recommended_max_bytes()
        ratio, ratio_source = self.watermark_ratio()
        total, available = self.ram_bytes()
        return [
            ("device", self.name),
            ("recommended max", f"{format_bytes(recommended)} ({source})"),
            ("watermark ratio", f"{ratio:.2f} ({ratio_source})"),
            ("unified memory", f"{format_bytes(total)} total, {format_bytes(available)} available"),
        ]

    def recommended_max_bytes(self) -> tuple[int, str]:
        """Metal's recommendedMaxWorkingSetSize, or an estimate from RAM where torch < 2.5 lacks it."""
        read = getattr(self._mps, "recommended_max_memory", None)
        if read is not None:
            return int(read()), "recommendedMaxWorkingSetSize"
        total, _ = self._host_memory()
        share = 2 / 3 if total <= 32 * GiB else 3 / 4
        return int(total * share), f"estimated as {share:.2f} of RAM (torch < 2.5 cannot read it)"

    @staticmethod
    def watermark_ratio() -> tuple[float, str]:
        """The high-watermark ratio torch starts with: PYTORCH_MPS_HIGH_WATERMARK_RATIO or 1.7."""
        raw = os.environ.get(MPS_WATERMARK_ENV)
        if raw is None:
            return MPS_DEFAULT_HIGH_WATERMARK_RATIO, "default"
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= MPS_MAX_HIGH_WATERMARK_RATIO:
            raise ValueError(
                f"{MPS_WATERMARK_ENV}={raw!r} is not a ratio between 0.0 and 2.0. "
                f"Unset it, or set it to e.g. 1.7 (0.0 disables the limit)."
            )
        return ratio, MPS_WATERMARK_ENV

    def limit(self, memory_limit: int | None = None) -> MemoryLimit:
        total, available = self._host_memory()
        recommended, recommended_source = self.recommended_max_bytes()
        ratio, ratio_source = self.watermark_ratio()
        if memory_limit is not None:
            _check_fits(memory_limit, total, "this Mac's", "of unified memory")
            return MemoryLimit(min(memory_limit, int(MPS_MAX_HIGH_WATERMARK_RATIO * recommended)), "memory_limit")
        held = int(self._mps.driver_allocated_memory())
        ram = available + held
        allocator = ratio * recommended if ratio > 0 else float("inf")
        if allocator <= ram:
            return MemoryLimit(
                int(allocator),
                f"{ratio:.2f} ({ratio_source}) x recommended max {format_bytes(recommended)} ({recommended_source})",
            )
        return MemoryLimit(
            ram,
            f"RAM: {format_bytes(available)} available + {format_bytes(held)} held by this process "
            f"(below the allocator's own cap of {ratio:.2f} x {format_bytes(recommended)}, which would swap)",
        )

    @contextmanager
    def session(self, limit_bytes: int) -> Iterator[None]:
        recommended, _ = self.recommended_max_bytes()
        # A session inside another (the trainer's probe inside its training cap) restores the outer one's cap.
        restore_ratio = self._fraction if self._fraction is not None else self.watermark_ratio()[0]
        fraction = float(min(limit_bytes / recommended, MPS_MAX_HIGH_WATERMARK_RATIO))
        self._mps.set_per_process_memory_fraction(fraction)
        outer, self._fraction = self._fraction, fraction
        try:
            yield
        finally:
            self._fraction = outer
            self._mps.set_per_process_memory_fraction(float(restore_ratio))

    def identity(self) -> str:
        total, _ = self._host_memory()
        recommended, _ = self.recommended_max_bytes()
        return f"{self.name}:{total}:{recommended}"

    def in_use_bytes(self) -> int:
        return int(self._mps.driver_allocated_memory())

    def ram_bytes(self) -> tuple[int, int]:
        """(total, available) unified memory: the Mac's RAM."""
        return self._host_memory()

    def _has_peak_stats(self) -> bool:
        # torch >= 2.13 keeps allocator peaks for MPS behind torch.accelerator; earlier versions raise
        # "Allocator for mps is not a DeviceAllocator", and a CUDA build without a GPU returns 0.
        if self._peak_stats is None:
            accelerator = self._accelerator
            try:
                self._peak_stats = bool(
                    accelerator is not None
                    and hasattr(accelerator, "max_memory_allocated")
                    and accelerator.is_available()
                    and getattr(accelerator.current_accelerator(), "type", None) == "mps"
                )
                if self._peak_stats:
                    accelerator.reset_peak_memory_stats()
            except RuntimeError:
                self._peak_stats = False
        return self._peak_stats

    @contextmanager
    def measure(self) -> Iterator[PeakWindow]:
        """Driver memory before and after every op of the block, and whether the allocator flushed its cache.

        Freed buffers stay in the allocator's cache, so driver memory only falls when the cache is released;
        inside a step nothing of ours releases it, so a fall means the allocator flushed it under pressure, at
        or near its limit: ``window.flushed`` says so, and the trial does not fit the budget.
        """
        window = PeakWindow()
        peak_stats = self._has_peak_stats()
        driver: list[int] = []
        allocated: list[int] = []

        def sample() -> None:
            driver.append(int(self._mps.driver_allocated_memory()))
            allocated.append(int(self._mps.current_allocated_memory()))

        self._mps.synchronize()
        sample()
        if peak_stats:
            self._accelerator.reset_peak_memory_stats()
        with _EveryOp(sample):
            yield window
        self._mps.synchronize()
        sample()
        window.peak_bytes = _positive(max(driver))
        tensor_peak = self._accelerator.max_memory_allocated() if peak_stats else max(allocated)
        window.allocated_bytes = _positive(tensor_peak)
        window.flushed = any(later < earlier for earlier, later in zip(driver, driver[1:]))

    def synchronize(self) -> None:
        self._mps.synchronize()

    def clear_cache(self) -> None:
        self._mps.synchronize()
        self._mps.empty_cache()


class CUDABackend(MemoryBackend):
    """NVIDIA GPUs through the CUDA caching allocator.

    The limit is the per-process memory fraction when one is set, else the device's free memory plus
    what this process already reserved. The peak is the step's peak *reserved* bytes. While probing,
    the fraction is set to the limit so an overshoot raises ``torch.OutOfMemoryError`` deterministically.
    """

    name = "cuda"
    pins_memory = True
    prefers_channels_last = True
    uses_grad_scaler = True
    syncs_batchnorm = True
    collectives = "nccl"

    def __init__(self, device: str = "cuda") -> None:
        self.device = torch.device(device)
        self.name = str(self.device)
        self._index = self.device.index if self.device.index is not None else torch.cuda.current_device()

    @staticmethod
    def is_available() -> bool:
        return torch.cuda.is_available()

    def identity(self) -> str:
        properties = torch.cuda.get_device_properties(self._index)
        return f"cuda:{properties.name}:{properties.total_memory}"

    def in_use_bytes(self) -> int:
        return int(torch.cuda.memory_reserved(self._index))

    def for_local_rank(self, local_rank: int) -> CUDABackend:
        torch.cuda.set_device(local_rank)  # before the process group starts: nccl binds to it
        return CUDABackend(f"cuda:{local_rank}")

    def choose_amp(self, setting: str) -> str | None:
        """ "auto" is bf16 where the GPU has it, else fp16 (with a GradScaler)."""
        if setting == "off":
            return None
        if setting == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return setting

    def describe(self) -> list[tuple[str, str]]:
        properties = torch.cuda.get_device_properties(self._index)
        return [("device", self.name), ("gpu", f"{properties.name}, {format_bytes(properties.total_memory)}")]

    def _fraction(self) -> float:
        read = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        return float(read(self._index)) if read is not None else 1.0

    def limit(self, memory_limit: int | None = None) -> MemoryLimit:
        total = torch.cuda.get_device_properties(self._index).total_memory
        if memory_limit is not None:
            _check_fits(memory_limit, total, f"{self.name}'s", "")
            return MemoryLimit(memory_limit, "memory_limit")
        fraction = self._fraction()
        if fraction < 1.0:
            return MemoryLimit(int(fraction * total), f"per-process memory fraction {fraction:.2f}")
        free, _ = torch.cuda.mem_get_info(self._index)
        reserved = torch.cuda.memory_reserved(self._index)
        return MemoryLimit(
            free + reserved,
            f"{format_bytes(free)} free on the device + {format_bytes(reserved)} reserved by this process",
        )

    @contextmanager
    def session(self, limit_bytes: int) -> Iterator[None]:
        total = torch.cuda.get_device_properties(self._index).total_memory
        previous = self._fraction()
        torch.cuda.set_per_process_memory_fraction(min(limit_bytes / total, 1.0), self._index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(previous, self._index)

    @contextmanager
    def measure(self) -> Iterator[PeakWindow]:
        window = PeakWindow()
        torch.cuda.synchronize(self._index)
        torch.cuda.reset_peak_memory_stats(self._index)
        yield window
        torch.cuda.synchronize(self._index)
        window.peak_bytes = _positive(torch.cuda.max_memory_reserved(self._index))
        window.allocated_bytes = _positive(torch.cuda.max_memory_allocated(self._index))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self._index)

    def clear_cache(self) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self._index)


class CPUBackend(MemoryBackend):
    """The host CPU, where nothing enforces a limit and the resident set is noisy.

    The peak is the step's live tensor bytes — parameters, gradients, optimizer state, activations —
    counted storage by storage as ops create them (tensors made before probing count once touched), so
    identical steps give identical peaks (REFERENCE.md C: the resident set grew 366, 104 and 64 MB in
    three identical steps). The default limit is min(4 GiB, half the available RAM), which leaves the
    rest of the machine to the process itself and everything else.
    """

    name = "cpu"
    shares_host_memory = True
    device = torch.device("cpu")

    def __init__(self, host_memory: HostMemory = _host_memory) -> None:
        self._host_memory = host_memory
        self._book: StorageBook | None = None
        self._generation = 0
        self._live = 0
        self._peak = 0

    @staticmethod
    def is_available() -> bool:
        return True

    def identity(self) -> str:
        return f"cpu:{platform.machine()}:{self._host_memory()[0]}"

    def in_use_bytes(self) -> int:
        """The live tensor bytes counted in an open session, else the process's resident set."""
        return self._live if self._book is not None else int(psutil.Process().memory_info().rss)

    def limit(self, memory_limit: int | None = None) -> MemoryLimit:
        total, available = self._host_memory()
        if memory_limit is not None:
            _check_fits(memory_limit, total, "this machine's", "of RAM")
            return MemoryLimit(memory_limit, "memory_limit")
        if available // 2 < CPU_DEFAULT_LIMIT_BYTES:
            return MemoryLimit(available // 2, f"half of the {format_bytes(available)} of available RAM")
        return MemoryLimit(CPU_DEFAULT_LIMIT_BYTES, "default CPU limit (4 GiB)")

    def _allocate(self, nbytes: int) -> tuple[int, int]:
        self._live += nbytes
        self._peak = max(self._peak, self._live)
        return self._generation, nbytes

    def _free(self, handle: object) -> None:
        generation, nbytes = typing.cast(tuple[int, int], handle)  # what _allocate returned
        if generation == self._generation:  # a storage booked in an earlier session is not in this count
            self._live -= nbytes

    @contextmanager
    def session(self, limit_bytes: int) -> Iterator[None]:
        # Each session counts afresh: tensors that outlived an earlier one are adopted again when touched.
        self._generation += 1
        self._live = self._peak = 0
        self._book = StorageBook(self._allocate, self._free, adopt_inputs="all")
        try:
            with self._book:
                yield
        finally:
            self._book = None

    @contextmanager
    def measure(self) -> Iterator[PeakWindow]:
        """The block's peak of live tensor bytes; outside a session, counted from a book opened for the block."""
        with self.session(0) if self._book is None else nullcontext():
            window = PeakWindow()
            self._peak = self._live
            yield window
            window.peak_bytes = window.allocated_bytes = _positive(self._peak)


BACKENDS: dict[str, type[MemoryBackend]] = {
    "mps": MPSBackend,
    "cuda": CUDABackend,
    "cpu": CPUBackend,
}
"""Device kinds by torch device type, in the order ``device="auto"`` tries them."""


def available_devices() -> list[str]:
    """The device kinds usable here, in the order ``device="auto"`` tries them.

    Example:
        >>> "cpu" in available_devices()
        True
    """
    return [kind for kind, backend in BACKENDS.items() if backend.is_available()]


def get_backend(device: str | MemoryBackend = "auto") -> MemoryBackend:
    """The memory backend for a torch device string, or the backend object itself.

    Args:
        device: "auto" (MPS, then CUDA, then CPU, each by its own availability check), "mps", "cuda",
            "cuda:N", "cpu", or a `MemoryBackend` (the simulation, for instance), returned as is.

    Raises:
        ValueError: an unknown device, or one that is not available here.

    Example:
        >>> get_backend("cpu").name
        'cpu'
    """
    if isinstance(device, MemoryBackend):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'mps' or a MemoryBackend, got {device!r}.")
    if device == "auto":
        return BACKENDS[available_devices()[0]]()
    kind = device.split(":", 1)[0]
    if kind not in BACKENDS or (kind != "cuda" and device != kind) or not re.fullmatch(r"[a-z]+(:\d+)?", device):
        raise ValueError(f"Unknown device {device!r}. Use one of: auto, mps, cuda, cuda:N, cpu.")
    if not BACKENDS[kind].is_available():
        found = ", ".join(repr(kind) for kind in available_devices())
        raise ValueError(f"Device {device!r} is not available on this machine (found: {found}). Use device='auto'.")
    return CUDABackend(device) if kind == "cuda" else BACKENDS[kind]()
