"""A caching allocator's books, by size: what it holds for a sequence of allocations and frees.

PyTorch's device allocators do not hand a tensor its exact bytes: they round each request up to a size
class and keep freed buffers in a cache, reusing one for a later request that fits. What a device holds
for a training step is therefore its tensors plus rounding plus cache, and how much of each depends on the
sizes and the order of the step's buffers, which change with the batch: at small batches most activations
are "small" buffers that reuse each other well; at larger ones they cross into the large pool, where a
cached buffer serves only a request close to its size. No fixed amount or factor per sample follows that
from one batch size to another; replaying the step's buffers through the allocator's rules does.

`CachingAllocator` keeps those books with the rules of `AllocatorModel` (by default MPSAllocator's:
aten/src/ATen/mps/MPSAllocator.{h,mm}). The simulated Mac is built on it, and `mps_autobatch.estimate`
replays a dry run's buffers through it to predict what a device holds at any batch size.

Example:
    >>> books = CachingAllocator()
    >>> a = books.allocate(3 * 2**20)        # a large buffer: rounded up to 2 MiB steps
    >>> books.live_bytes // 2**20
    4
    >>> books.release(a); books.live_bytes, books.heap_bytes // 2**20   # freed, but cached
    (0, 4)
    >>> b = books.allocate(2**20 + 1)        # served from the cached 4 MiB buffer (within the slack)
    >>> books.live_bytes // 2**20, books.heap_bytes // 2**20
    (4, 4)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

__all__ = ["MPS_ALLOCATOR", "AllocatorModel", "Buffer", "CachingAllocator"]

KiB, MiB = 2**10, 2**20


@dataclass(frozen=True)
class AllocatorModel:
    """The allocator's constants and rules; the defaults are MPSAllocator.h's (kMaxSmallAlloc, kRoundLarge, ...).

    A search that is right here must stay right when rounding, reuse, caching or other allocations behave
    otherwise, so each rule below has a variant (`mps_autobatch.simulate.ALLOCATOR_VARIANTS` names them),
    imitating what PyTorch's allocators do in some version, mode or machine.

    Attributes:
        page_bytes: small buffers are rounded up to this (the 16 KiB page of Apple silicon).
        small_max_bytes: the largest "small" buffer.
        large_round_bytes: large buffers are rounded up to this.
        large_rounding: "fixed" rounds large buffers up to ``large_round_bytes``; "power_of_two" up to the next
            power of two, as heaps sized in powers of two hold them (MTLHeap sizes; the CUDA caching allocator's
            ``roundup_power2_divisions`` in PYTORCH_CUDA_ALLOC_CONF does the same to block sizes).
        reuse: which cached buffer serves a request. "slack": one of the same pool at most
            ``reuse_slack_bytes`` larger (kLargeHeap's slack); "best_fit_2x": the smallest of the same pool at
            most twice the request, as MPSAllocator's get_free_buffer takes the smallest cached buffer at least
            as large (``available_buffers.lower_bound``) and a heap serves any request that fits in it.
        reuse_slack_bytes: the slack of ``reuse="slack"``.
        other_bytes: driver memory outside PyTorch's heaps (Metal, MPSGraph), present from the start.
        graph_bytes_per_shape: driver memory added per new (op, input shapes) signature, as MPSGraph
            caches grow with distinct shapes (pytorch/pytorch#132596); never released by ``empty_cache``.
        flush_at: the fraction of the limit past which the allocator releases its cached buffers before
            growing (MPSAllocator.mm's malloc: ``garbage_collect_cached_buffers`` under memory pressure, past the
            low watermark); 1.0: only when the limit itself would be passed, just before failing.
    """

    page_bytes: int = 16 * KiB
    small_max_bytes: int = 1 * MiB
    large_round_bytes: int = 2 * MiB
    large_rounding: Literal["fixed", "power_of_two"] = "fixed"
    reuse: Literal["slack", "best_fit_2x"] = "slack"
    reuse_slack_bytes: int = 32 * MiB
    other_bytes: int = 64 * MiB
    graph_bytes_per_shape: int = 0
    flush_at: float = 1.0


MPS_ALLOCATOR = AllocatorModel()
"""MPSAllocator's rules, as PyTorch's MPS backend ships them."""


class Buffer:
    """One buffer the allocator handed out: its rounded size."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _round_up(size: int, step: int) -> int:
    return -(-size // step) * step


class CachingAllocator:
    """The books of a caching allocator: live buffers, cached ones, and the heaps that hold both.

    It keeps no limit: what happens near one (flushing the cache, failing) is the device's policy, as in
    `mps_autobatch.simulate.SimulatedMPS`; `allocate` is what happens far from it.

    Args:
        rules: the rounding and reuse rules; MPSAllocator's by default.
    """

    def __init__(self, rules: AllocatorModel = MPS_ALLOCATOR) -> None:
        self.rules = rules
        self.live_bytes = 0
        """Bytes of the buffers in use (rounded sizes)."""
        self.heap_bytes = 0
        """Bytes of the buffers in use and in the cache: what the allocator holds from the device."""
        self.peak_heap_bytes = 0
        """The highest ``heap_bytes`` since `reset_peak`."""
        self._cache: list[tuple[int, int, Buffer]] = []  # sorted (size, id, buffer)

    @property
    def cached_bytes(self) -> int:
        """Bytes of freed buffers kept for reuse."""
        return self.heap_bytes - self.live_bytes

    def size_class(self, nbytes: int) -> int:
        """The size a request of ``nbytes`` is rounded up to."""
        rules = self.rules
        if nbytes <= rules.small_max_bytes:
            return _round_up(max(nbytes, 1), rules.page_bytes)
        if rules.large_rounding == "power_of_two":
            return 1 << (nbytes - 1).bit_length()
        return _round_up(nbytes, rules.large_round_bytes)

    def take_cached(self, size: int) -> Buffer | None:
        """A cached buffer that serves a request of rounded ``size``, now in use; None if none does."""
        # Small and large buffers live in separate pools (MPSAllocator's get_pool): a small request is
        # never served from a large cached buffer, and a large one only within the slack (or twice its size).
        index = bisect.bisect_left(self._cache, (size, -1))
        if index == len(self._cache):
            return None
        cached = self._cache[index][0]
        small = self.rules.small_max_bytes
        same_pool = (cached <= small) == (size <= small)
        most = 2 * size if self.rules.reuse == "best_fit_2x" else size + self.rules.reuse_slack_bytes
        if not (same_pool and cached <= most):
            return None
        buffer = self._cache.pop(index)[2]
        self._use(buffer)
        return buffer

    def grow(self, size: int) -> Buffer:
        """A new buffer of rounded ``size`` from the device, now in use."""
        buffer = Buffer(size)
        self.heap_bytes += size
        self._use(buffer)
        return buffer

    def allocate(self, nbytes: int) -> Buffer:
        """A buffer for ``nbytes``: a cached one that serves it, else a new one."""
        size = self.size_class(nbytes)
        return self.take_cached(size) or self.grow(size)

    def release(self, buffer: Buffer) -> None:
        """Return a buffer to the cache."""
        self.live_bytes -= buffer.size
        bisect.insort(self._cache, (buffer.size, id(buffer), buffer))

    def empty_cache(self) -> None:
        """Give every cached buffer back to the device (``torch.mps.empty_cache``)."""
        self.heap_bytes = self.live_bytes
        self._cache.clear()

    def reset_peak(self) -> None:
        """Start ``peak_heap_bytes`` again from what is held now."""
        self.peak_heap_bytes = self.heap_bytes

    def _use(self, buffer: Buffer) -> None:
        self.live_bytes += buffer.size
        self.peak_heap_bytes = max(self.peak_heap_bytes, self.heap_bytes)
