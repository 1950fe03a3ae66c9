"""Read an out-of-memory message from PyTorch and say, with its own numbers, what ran out and what to do.

Pure text parsing: no torch import, so a log pasted from another machine can be explained anywhere.
Every size PyTorch prints in these messages is binary, even where MPS writes "GB"/"MB" (torch <= 2.5):
1 GB there is 2**30 bytes (``format_size`` in aten/src/ATen/mps/MPSAllocator.mm).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ._units import format_bytes

__all__ = ["OOMExplanation", "explain_oom"]

_SCALE = {"bytes": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
_SIZE = r"(\d+(?:\.\d+)?) ?(bytes|[KMGT]i?B)"

# MPSAllocator.mm, both variants: "max allowed" is missing when the high-watermark ratio is 0.0.
_MPS = re.compile(
    rf"MPS backend out of memory \(MPS allocated: {_SIZE}, other allocations: {_SIZE}(?:, max allowed: {_SIZE})?\)"
    rf"(?:\. ?Tried to allocate {_SIZE} on (shared|private) pool)?"
)
_BUFFER = re.compile(rf"Invalid buffer size: {_SIZE}")
# CUDACachingAllocator.cpp since torch 2.1 ("capacty" until 2.2; HIP on ROCm; bare "Out of memory" on newer torch).
_CUDA_NEW = re.compile(
    rf"(?:(?:CUDA|HIP) out|Out) of memory\. Tried to allocate {_SIZE}\. GPU (\d+) has a total capaci?ty of {_SIZE}"
    rf" of which {_SIZE} is free\."
)
# Before torch 2.1 ("cached" before 1.4): sizes in one parenthesis, "N allowed;" under a memory fraction.
_CUDA_OLD = re.compile(
    rf"(?:CUDA|HIP) out of memory\. Tried to allocate {_SIZE} \(GPU (\d+); {_SIZE} total capacity; {_SIZE} already"
    rf" allocated; {_SIZE} free; (?:{_SIZE} allowed; )?{_SIZE} (reserved in total by PyTorch|cached)\)"
)
_CUDA_REJECTED = re.compile(rf"CUDA out of memory\. Allocation was preemptively rejected.*?Requested size: {_SIZE}")
_CPU = re.compile(
    r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory): you tried to allocate (\d+) bytes"
)
# Texts that carry no sizes: (substring, kind, cause).
_BARE: tuple[tuple[str, str, str], ...] = (
    (
        "CUBLAS_STATUS_ALLOC_FAILED",
        "cuda",
        "cuBLAS could not allocate its handle or workspace: the GPU was full, usually because PyTorch's cache "
        "already held nearly all of it.",
    ),
    (
        "CUDNN_STATUS_ALLOC_FAILED",
        "cuda",
        "cuDNN could not allocate its workspace: the GPU was full.",
    ),
    (
        "CUDNN_STATUS_NOT_SUPPORTED",
        "cuda",
        "cuDNN reports NOT_SUPPORTED when it cannot get workspace memory for a large input (pytorch/pytorch#4107); "
        "a smaller batch usually makes it pass.",
    ),
    (
        "CUDA error: out of memory",
        "cuda",
        "A CUDA allocation outside PyTorch's caching allocator failed (the CUDA context, a library or a kernel "
        "launch); the message carries no sizes.",
    ),
    ("CUDA out of memory", "cuda", "CUDA ran out of memory; the message carries no sizes."),
    ("MPS backend out of memory", "mps", "MPS ran out of memory; the message carries no sizes."),
)
# Torch's MPS high-watermark default (torch/mps/__init__.py, MPSAllocator.h).
_DEFAULT_WATERMARK_RATIO = 1.7


@dataclass(frozen=True)
class OOMExplanation:
    """What one out-of-memory message says, in bytes, and what to do about it.

    Sizes are ints of bytes, None where the message does not print them. ``over_by_bytes`` is
    ``allocated_bytes + other_bytes + tried_bytes - limit_bytes``: how far the failed request went past the
    limit (zero or below means the printed, rounded sizes sit within rounding of it).

    Attributes:
        kind: "mps", "cuda", "cpu", or "buffer" (one Metal buffer larger than the device allows).
        message: the out-of-memory sentence found in the text, whitespace collapsed.
        allocated_bytes: tensors PyTorch holds (MPS allocated; CUDA allocated by PyTorch).
        other_bytes: the rest counted against the limit. MPS: the allocator's cache, MPSGraph and driver memory.
            CUDA under a memory fraction: reserved but unallocated; otherwise all device memory in use that
            is not PyTorch's tensors (its cache, the CUDA context, other processes).
        limit_bytes: MPS max allowed; CUDA the ``allowed`` cap, else the total capacity.
        limit_source: where ``limit_bytes`` comes from: "max allowed", "allowed" or "total capacity".
        tried_bytes: the size of the failed request.
        over_by_bytes: allocated + other + tried - limit.
        free_bytes: CUDA only, what the driver reported free.
        total_bytes: CUDA only, the GPU's total capacity.
        reserved_unallocated_bytes: CUDA only, PyTorch's cache that holds no tensor.
        pool: MPS only, "private" or "shared".
        causes: why it happened, with the numbers.
        fixes: next steps, most useful first.
    """

    kind: str
    message: str
    allocated_bytes: int | None = None
    other_bytes: int | None = None
    limit_bytes: int | None = None
    limit_source: str | None = None
    tried_bytes: int | None = None
    over_by_bytes: int | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None
    reserved_unallocated_bytes: int | None = None
    pool: str | None = None
    causes: tuple[str, ...] = ()
    fixes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The explanation as JSON-ready data (causes and fixes as lists)."""
        data = dataclasses.asdict(self)
        data["causes"], data["fixes"] = list(self.causes), list(self.fixes)
        return data


def _bytes(value: str | None, unit: str | None) -> int | None:
    if value is None or unit is None:
        return None
    return round(float(value) * _SCALE[unit.lower().replace("i", "")])


def _over(*sizes: int | None, limit: int | None) -> int | None:
    if limit is None or any(size is None for size in sizes):
        return None
    return sum(size for size in sizes if size is not None) - limit


def _snippet(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line if len(line) <= 60 else line[:57] + "..."


def _mps(match: re.Match[str], message: str) -> OOMExplanation:
    allocated, other = _bytes(*match.group(1, 2)), _bytes(*match.group(3, 4))
    limit, tried = _bytes(*match.group(5, 6)), _bytes(*match.group(7, 8))
    over = _over(allocated, other, tried, limit=limit)
    causes = [
        f"PyTorch's tensors hold {format_bytes(allocated)} (MPS allocated).",
        f"Other allocations, {format_bytes(other)}, are the rest of what Metal holds for this process: the "
        "allocator's cache of freed buffers, MPSGraph's compiled graphs and driver memory.",
    ]
    if allocated is not None and other is not None and other > allocated:
        causes.append(
            "Other allocations exceed the tensors themselves: cached buffers or graph caches grew, often from "
            "input shapes that change between steps (pytorch/pytorch#132596)."
        )
    if limit is None:
        causes.append(
            "There is no max allowed: the limit was disabled (PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0), so the Mac "
            "swapped until Metal itself could not allocate."
        )
    else:
        causes.append(
            f"Max allowed, {format_bytes(limit)}, is the high-watermark ratio x the GPU's "
            f"recommendedMaxWorkingSetSize: with the default ratio {_DEFAULT_WATERMARK_RATIO} that is "
            f"{format_bytes(limit / _DEFAULT_WATERMARK_RATIO)} recommended. PYTORCH_MPS_HIGH_WATERMARK_RATIO (or "
            "torch.mps.set_per_process_memory_fraction) sets the ratio, up to 2.0; 0.0 removes the limit and "
            "lets the Mac swap (may cause system failure)."
        )
    if tried is not None:
        pool = f" on the {match.group(9)} pool" if match.group(9) else ""
        causes.append(f"The failed request was {format_bytes(tried)}{pool}.")
    if over is not None:
        causes.append(_over_text(over, "Allocated + other + request"))
    return OOMExplanation(
        kind="mps",
        message=message,
        allocated_bytes=allocated,
        other_bytes=other,
        limit_bytes=limit,
        limit_source="max allowed" if limit is not None else None,
        tried_bytes=tried,
        over_by_bytes=over,
        pool=match.group(9),
        causes=tuple(causes),
        fixes=_fixes("mps", limit, other),
    )


def _over_text(over: int, terms: str) -> str:
    if over > 0:
        return f"{terms} is {format_bytes(over)} over the limit."
    return (
        f"{terms} is within rounding of the limit ({format_bytes(-over)} under it as printed): the sizes are "
        "rounded, and the allocator asks for whole blocks."
    )


def _cuda_new(match: re.Match[str], text: str) -> OOMExplanation:
    tried, gpu = _bytes(*match.group(1, 2)), match.group(3)
    total, free = _bytes(*match.group(4, 5)), _bytes(*match.group(6, 7))
    # The optional sentences follow the head in a fixed order; read them from the text that follows it.
    rest = text[match.end() : match.end() + 2000]
    end = rest.find("If reserved")
    rest = rest if end < 0 else rest[:end]
    others = [_bytes(*found) for found in re.findall(rf"Process \d+ has {_SIZE} memory in use", rest)]
    this = re.search(rf"this process has {_SIZE} memory in use", rest)
    allowed = re.search(rf"{_SIZE} allowed;", rest)
    split = re.search(
        rf"Of the allocated memory {_SIZE} is allocated by PyTorch,(?: with {_SIZE} allocated in private pools"
        rf" \([^)]*\),)? and {_SIZE} is reserved by PyTorch but unallocated",
        rest,
    )
    allocated = _bytes(*split.group(1, 2)) if split else None
    unallocated = _bytes(*split.group(5, 6)) if split else None
    message = (match.group(0) + rest).strip()
    return _cuda(
        message,
        gpu=gpu,
        tried=tried,
        total=total,
        free=free,
        allocated=allocated,
        unallocated=unallocated,
        allowed=_bytes(*allowed.group(1, 2)) if allowed else None,
        other_processes=sum(size for size in others if size is not None) if others else None,
        own_process_named=this is not None,
    )


def _cuda_old(match: re.Match[str]) -> OOMExplanation:
    allocated, last = _bytes(*match.group(6, 7)), _bytes(*match.group(12, 13))
    # "cached" (torch < 1.4) is the unused cache itself; "reserved in total" includes the tensors.
    unallocated = last if match.group(14) == "cached" or last is None or allocated is None else last - allocated
    return _cuda(
        match.group(0),
        gpu=match.group(3),
        tried=_bytes(*match.group(1, 2)),
        total=_bytes(*match.group(4, 5)),
        free=_bytes(*match.group(8, 9)),
        allocated=allocated,
        unallocated=unallocated,
        allowed=_bytes(*match.group(10, 11)),
        other_processes=None,
        own_process_named=True,
    )


def _cuda(
    message: str,
    *,
    gpu: str,
    tried: int | None,
    total: int | None,
    free: int | None,
    allocated: int | None,
    unallocated: int | None,
    allowed: int | None,
    other_processes: int | None,
    own_process_named: bool,
) -> OOMExplanation:
    limit: int | None
    other: int | None
    if allowed is not None:
        # set_per_process_memory_fraction caps what PyTorch reserves: tensors plus its cache.
        limit, other, source = allowed, unallocated, "allowed"
    else:
        limit, source = total, "total capacity"
        used = None if total is None or free is None else total - free
        other = None if used is None or allocated is None else max(0, used - allocated)
    over = _over(allocated, other, tried, limit=limit)
    causes = [f"The failed request was {format_bytes(tried)} on GPU {gpu}."]
    if allocated is not None:
        causes.append(f"PyTorch's tensors hold {format_bytes(allocated)}.")
    fragmented = bool(unallocated and limit and unallocated * 20 >= limit)
    if fragmented:
        causes.append(
            f"Fragmentation is likely: {format_bytes(unallocated)} is reserved by PyTorch but unallocated, cached "
            "blocks that could not hold this request. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lets the "
            "cache grow in place instead (torch still prints this hint when it is already on: pytorch/pytorch#173049)."
        )
    crowded = other_processes is not None and total is not None and other_processes * 20 >= total
    if crowded:
        whose = "Another process holds" if own_process_named else "A process PyTorch cannot name as this one holds"
        causes.append(
            f"{whose} {format_bytes(other_processes)} on this GPU"
            + ("." if own_process_named else " (inside a container this run shows up by its host PID).")
        )
    if allowed is not None:
        causes.append(
            f"The cap set with torch.cuda.set_per_process_memory_fraction, {format_bytes(allowed)} allowed of "
            f"{format_bytes(total)}, refused it; the card had {format_bytes(free)} free."
        )
    if tried is not None and total is not None and tried > total:
        causes.append(f"The request alone is larger than the whole GPU ({format_bytes(total)}).")
    elif allowed is None and tried is not None and free is not None and tried <= free:
        causes.append(
            f"The driver reported {format_bytes(free)} free, more than the request: that memory is not in one "
            "piece, or another process took it meanwhile."
        )
    if allocated is not None and total is not None and allocated > total:
        causes.append(
            "PyTorch reports more allocated than the GPU holds: the driver spilled into shared system memory (Windows)."
        )
    if over is not None:
        terms = "Allocated + reserved-but-unallocated + request" if allowed else "Memory in use + request"
        causes.append(_over_text(over, terms))
        if over > 0 and not fragmented and not crowded:
            causes.append("A plain overshoot: the step needs more than fits.")
    return OOMExplanation(
        kind="cuda",
        message=message,
        allocated_bytes=allocated,
        other_bytes=other,
        limit_bytes=limit,
        limit_source=source if limit is not None else None,
        tried_bytes=tried,
        over_by_bytes=over,
        free_bytes=free,
        total_bytes=total,
        reserved_unallocated_bytes=unallocated,
        causes=tuple(causes),
        fixes=_fixes("cuda", limit if allowed is not None else None, unallocated, gpu=gpu, fragmented=fragmented),
    )


def _fixes(
    kind: str, limit: int | None, cache: int | None, *, gpu: str | None = None, fragmented: bool = False
) -> tuple[str, ...]:
    """The next steps, most useful first: the probe, accumulation, a cap, cache clearing, the step's levers."""
    device = {"mps": "mps", "buffer": "mps", "cpu": "cpu"}.get(
        kind, f"cuda:{gpu}" if gpu not in (None, "0") else "cuda"
    )
    memory_limit = f" --memory-limit {limit / 2**30:.2f}GiB" if limit is not None else ""
    fixes = [
        f"Find the largest batch size that fits, measured with real training steps: autobatch probe --device "
        f"{device} --model MODEL --image-size SIZE{memory_limit}",
        "Keep the batch size you wanted as the effective batch: add --requested N (N = the batch size that failed) "
        "and the probe plans a smaller micro-batch with gradient accumulation.",
    ]
    if fragmented:
        fixes.insert(0, "Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the environment before the run.")
    if kind in ("mps", "buffer"):
        fixes += [
            "Cap memory so an overshoot raises instead of swapping: torch.mps.set_per_process_memory_fraction(1.0) "
            "(a float ratio of recommendedMaxWorkingSetSize, 0 to 2) before training.",
            "Empty the allocator's cache on a cadence: torch.mps.empty_cache() every 10 batches"
            + (f" (other allocations were {format_bytes(cache)})" if cache else "")
            + ", and keep input shapes fixed so MPSGraph does not build a graph per shape.",
        ]
    elif kind == "cuda":
        fixes += [
            "Cap PyTorch's share so the limit is the same on every run and leaves room for others: "
            "torch.cuda.set_per_process_memory_fraction(0.9).",
            "torch.cuda.empty_cache() after each evaluation pass returns idle cached blocks to the driver; every "
            "step it only slows training.",
        ]
    if kind == "buffer":
        fixes.append("Split the one huge operation: run evaluation or attention over the batch in chunks.")
    if kind == "cpu":
        fixes.append("Close other programs or add swap; on Linux a larger overshoot is killed, not raised.")
    levers = "a smaller --image-size (activations grow with its square), --amp bf16 (or fp16)"
    if kind == "cuda":
        levers += ", --channels-last"
    fixes.append(
        f"Then shrink the step itself: {levers}, --optimizer sgd instead of AdamW (no per-weight moment "
        "buffers), gradient checkpointing (torch.utils.checkpoint) to recompute activations."
    )
    return tuple(fixes)


def _cpu(match: re.Match[str]) -> OOMExplanation:
    tried = int(match.group(1))
    causes = (
        f"The CPU allocator could not get {format_bytes(tried)} ({tried} bytes) from the operating system: RAM and "
        "swap (on Windows, the page file) are exhausted.",
    )
    return OOMExplanation(
        kind="cpu", message=match.group(0), tried_bytes=tried, causes=causes, fixes=_fixes("cpu", None, None)
    )


def _buffer(match: re.Match[str]) -> OOMExplanation:
    tried = _bytes(*match.group(1, 2))
    causes = (
        f"One buffer of {format_bytes(tried)} is more than Metal allows for a single allocation (the device's "
        "maxBufferLength), whatever memory is free: one tensor in this step is too big.",
    )
    return OOMExplanation(
        kind="buffer", message=match.group(0), tried_bytes=tried, causes=causes, fixes=_fixes("buffer", None, None)
    )


def explain_oom(text_or_exception: str | BaseException) -> OOMExplanation:
    """Explain an out-of-memory message from PyTorch on MPS, CUDA or CPU, with the numbers it prints.

    Finds the message anywhere in the text (a pasted traceback or log will do) and reads every size in it,
    so you see what was allocated, what else held memory, the limit, the failed request and how far over it
    was, then the causes and the next steps.

    Args:
        text_or_exception: the error text, a whole traceback or log, or the exception itself.

    Returns:
        The sizes in bytes (None where the text does not print them), the causes and the fixes.

    Raises:
        ValueError: the text holds no out-of-memory message PyTorch raises.

    Example:
        >>> exp = explain_oom("RuntimeError: MPS backend out of memory (MPS allocated: 45.59 GiB, other "
        ...     "allocations: 1.02 GiB, max allowed: 47.74 GiB). Tried to allocate 1.25 GiB on private pool.")
        >>> exp.kind, exp.limit_bytes == round(47.74 * 2**30), format_bytes(exp.over_by_bytes)
        ('mps', True, '122.88 MiB')
        >>> explain_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")).kind
        'cuda'
        >>> explain_oom("mat1 and mat2 shapes cannot be multiplied")
        Traceback (most recent call last):
        ...
        ValueError: 'mat1 and mat2 shapes cannot be multiplied' is not an out-of-memory error PyTorch raises. Paste \
the whole error line or traceback, e.g. 'RuntimeError: MPS backend out of memory (...)'.
    """
    raw = str(text_or_exception)
    # Pasted logs wrap lines anywhere; the patterns expect single spaces.
    text = " ".join(raw.split())
    if match := _MPS.search(text):
        return _mps(match, match.group(0))
    if match := _BUFFER.search(text):
        return _buffer(match)
    if match := _CUDA_NEW.search(text):
        return _cuda_new(match, text)
    if match := _CUDA_OLD.search(text):
        return _cuda_old(match)
    if match := _CUDA_REJECTED.search(text):
        tried = _bytes(*match.group(1, 2))
        causes = (f"The {format_bytes(tried)} request was refused up front: it would pass the memory fraction cap.",)
        return OOMExplanation(
            kind="cuda", message=match.group(0), tried_bytes=tried, causes=causes, fixes=_fixes("cuda", None, None)
        )
    if match := _CPU.search(text):
        return _cpu(match)
    for needle, kind, cause in _BARE:
        if needle in text:
            fixes = _fixes(kind, None, None)
            if needle.startswith("CUDNN"):
                fixes = ("torch.backends.cudnn.benchmark = False picks algorithms with smaller workspaces.", *fixes)
            return OOMExplanation(kind=kind, message=needle, causes=(cause,), fixes=fixes)
    raise ValueError(
        f"{_snippet(raw)!r} is not an out-of-memory error PyTorch raises. Paste the whole error line or traceback, "
        "e.g. 'RuntimeError: MPS backend out of memory (...)'."
    )
