"""Tell an out-of-memory failure from every other exception, on MPS, CUDA and CPU."""

from __future__ import annotations

import torch

__all__ = ["OOM_MESSAGES", "is_oom_error"]

# Substrings of every out-of-memory text PyTorch raises as a plain RuntimeError (REFERENCE.md B, C).
OOM_MESSAGES: tuple[str, ...] = (
    # MPS, both variants (with and without the high-watermark limit), GB/GiB units alike:
    # aten/src/ATen/mps/MPSAllocator.mm
    "MPS backend out of memory",
    # MPS: a single buffer larger than Metal allows (same file, alloc_buffer_block).
    "Invalid buffer size",
    # CUDA caching allocator (torch.OutOfMemoryError, but older code re-raises it as RuntimeError).
    "CUDA out of memory",
    # A kernel launch or cudaMalloc outside the caching allocator.
    "CUDA error: out of memory",
    # cuBLAS failing to allocate its workspace.
    "CUBLAS_STATUS_ALLOC_FAILED",
    # cuDNN reports a failed workspace allocation this way (toma cites pytorch/pytorch#4107).
    "CUDNN_STATUS_NOT_SUPPORTED",
    # CPU allocator (c10/core/impl/alloc_cpu.cpp): POSIX and Windows wordings.
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
)


def is_oom_error(exc: BaseException) -> bool:
    """Whether an exception means "this step needed more memory than the device allows".

    Decided by type first (``torch.OutOfMemoryError``, with or without a message; Python's
    ``MemoryError``), then by the texts PyTorch's allocators raise as a plain ``RuntimeError``,
    including the MPS one that peers miss (it is never a ``torch.OutOfMemoryError``).

    Args:
        exc: any exception.

    Returns:
        True for an out-of-memory failure, False for everything else.

    Example:
        >>> is_oom_error(RuntimeError("MPS backend out of memory (MPS allocated: 9.00 GiB, other "
        ...     "allocations: 1.00 MiB, max allowed: 9.07 GiB). Tried to allocate 256.00 MiB on private pool. "
        ...     "Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations "
        ...     "(may cause system failure)."))
        True
        >>> is_oom_error(torch.OutOfMemoryError())
        True
        >>> is_oom_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(message in text for message in OOM_MESSAGES)
