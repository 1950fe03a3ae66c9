"""`explain_oom` and `autobatch explain` on real out-of-memory texts copied from public issue threads.

Each text is the error exactly as its thread posted it (only the error, not the surrounding prose), cited as
owner/repo#number; each row lists the sizes the parser must read, in bytes, from the printed values.
Torch prints binary sizes everywhere here, MPS "GB"/"MB" included.
"""

import io
import json
import sys

import pytest
import typer
from oom_texts import MPS_UNLIMITED
from typer.testing import CliRunner

from mps_autobatch._cli_common import _BadInput
from mps_autobatch._cli_explain import _read, register
from mps_autobatch.explain import OOMExplanation, explain_oom

G, M, K = 2**30, 2**20, 2**10


def b(value: float, unit: int) -> int:
    return round(value * unit)


def cuda_other(total: int, free: int, allocated: int) -> int:
    """Without a memory fraction, everything in use on the card that is not PyTorch's tensors."""
    return max(0, total - free - allocated)


# (source, text, kind, allocated, other, limit, tried)
CORPUS = [
    # --- MPS, GiB/MiB units (torch >= 2.8) ---
    (
        "Comfy-Org/ComfyUI#7440",
        "MPS backend out of memory (MPS allocated: 9.57 GiB, other allocations: 17.35 GiB, max allowed: 27.20 GiB). "
        "Tried to allocate 292.50 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure).",
        "mps",
        b(9.57, G),
        b(17.35, G),
        b(27.20, G),
        b(292.50, M),
    ),
    (
        "Comfy-Org/ComfyUI#8984",
        "MPS backend out of memory (MPS allocated: 15.72 GiB, other allocations: 2.41 MiB, max allowed: 18.13 GiB). "
        "Tried to allocate 5.81 GiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure).",
        "mps",
        b(15.72, G),
        b(2.41, M),
        b(18.13, G),
        b(5.81, G),
    ),
    # --- MPS, GB/MB units (torch <= 2.5), binary all the same ---
    (
        # Cut short in the thread after the advice's first words.
        "Comfy-Org/ComfyUI#2489",
        "RuntimeError: MPS backend out of memory (MPS allocated: 5.56 GB, other allocations: 1.10 GB, max allowed: "
        "6.80 GB). Tried to allocate 768.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0",
        "mps",
        b(5.56, G),
        b(1.10, G),
        b(6.80, G),
        b(768.00, M),
    ),
    (
        "Comfy-Org/ComfyUI#7372",
        "MPS backend out of memory (MPS allocated: 17.68 GB, other allocations: 3.95 MB, max allowed: 18.13 GB). "
        "Tried to allocate 1024.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure).",
        "mps",
        b(17.68, G),
        b(3.95, M),
        b(18.13, G),
        b(1024.00, M),
    ),
    (
        "pinokiocomputer/pinokio#941",
        "MPS backend out of memory (MPS allocated: 16.00 GB, other allocations: 3.31 GB, max allowed: 18.13 GB). "
        "Tried to allocate 256 bytes on shared pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure).",
        "mps",
        b(16.00, G),
        b(3.31, G),
        b(18.13, G),
        256,
    ),
    (
        "pytorch/torchchat#974",
        "WeightsUnpickler error: MPS backend out of memory (MPS allocated: 1.02 GB, other allocations: 0 bytes, max "
        "allowed: 15.87 GB). Tried to allocate 256 bytes on shared pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to "
        "disable upper limit for memory allocations (may cause system failure).",
        "mps",
        b(1.02, G),
        0,
        b(15.87, G),
        256,
    ),
    (
        # Posted across three lines.
        "lululxvi/deepxde#1973",
        "RuntimeError: MPS backend out of memory (MPS allocated: 0 bytes, other allocations: 0 bytes, max allowed: "
        "7.93 GB).\nTried to allocate 256 bytes on shared pool.\nUse PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable "
        "upper limit for memory allocations (may cause system failure).",
        "mps",
        0,
        0,
        b(7.93, G),
        256,
    ),
    (
        "pytorch/pytorch#96814",
        "MPS backend out of memory (MPS allocated: 7.43 GB, other allocations: 24.46 GB, max allowed: 32.00 GB). "
        "Tried to allocate 129.21 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure).",
        "mps",
        b(7.43, G),
        b(24.46, G),
        b(32.00, G),
        b(129.21, M),
    ),
    (
        # No final full stop.
        "pharmapsychotic/clip-interrogator-ext#74",
        "MPS backend out of memory (MPS allocated: 6.04 GB, other allocations: 1.04 GB, max allowed: 6.77 GB). "
        "Tried to allocate 459.07 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure)",
        "mps",
        b(6.04, G),
        b(1.04, G),
        b(6.77, G),
        b(459.07, M),
    ),
    (
        # The rounded sizes add up to just under the limit.
        "lllyasviel/Fooocus#1139",
        "RuntimeError: MPS backend out of memory (MPS allocated: 8.89 GB, other allocations: 172.98 MB, max allowed: "
        "9.07 GB). Tried to allocate 6.25 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable "
        "upper limit for memory allocations (may cause system failure).",
        "mps",
        b(8.89, G),
        b(172.98, M),
        b(9.07, G),
        b(6.25, M),
    ),
    (
        "pytorch/pytorch#105839",
        "MPS backend out of memory (MPS allocated: 1.45 GB, other allocations: 7.42 GB, max allowed: 9.07 GB). "
        "Tried to allocate 563.62 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
        "limit for memory allocations (may cause system failure).",
        "mps",
        b(1.45, G),
        b(7.42, G),
        b(9.07, G),
        b(563.62, M),
    ),
    # --- Metal: one buffer over the device's maximum ---
    ("pytorch/pytorch#78042", "RuntimeError: Invalid buffer size: 9.75 GB", "buffer", None, None, None, b(9.75, G)),
    ("kijai/ComfyUI-SUPIR#151", "Invalid buffer size: 19.38 GiB", "buffer", None, None, None, b(19.38, G)),
    # --- CUDA, the form before torch 2.1: one parenthesis ---
    (
        "pytorch/pytorch#59778",
        "CUDA out of memory. Tried to allocate 2.26 GiB (GPU 0; 6.00 GiB total capacity; 781.59 MiB already "
        "allocated; 3.03 GiB free; 1.24 GiB reserved in total by PyTorch) ",
        "cuda",
        b(781.59, M),
        cuda_other(b(6.00, G), b(3.03, G), b(781.59, M)),
        b(6.00, G),
        b(2.26, G),
    ),
    (
        # More allocated than the card holds (Windows shared memory): nothing else is counted.
        "YingqianWang/iPASSR#9",
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 10.73 GiB (GPU 0; 8.00 GiB total "
        "capacity; 17.20 GiB already allocated; 0 bytes free; 19.15 GiB reserved in total by PyTorch) If reserved "
        "memory is >> allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for "
        "Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        "cuda",
        b(17.20, G),
        0,
        b(8.00, G),
        b(10.73, G),
    ),
    (
        # torch < 1.4 wrote "cached" for reserved but unallocated.
        "pytorch/pytorch#16417",
        "RuntimeError: CUDA out of memory. Tried to allocate 12.50 MiB (GPU 0; 10.92 GiB total capacity; 8.57 MiB "
        "already allocated; 9.28 GiB free; 4.68 MiB cached)",
        "cuda",
        b(8.57, M),
        cuda_other(b(10.92, G), b(9.28, G), b(8.57, M)),
        b(10.92, G),
        b(12.50, M),
    ),
    (
        "Strawberry-Eat-Mango/PCT_Pytorch#27",
        "RuntimeError: CUDA out of memory. Tried to allocate 16.00 MiB (GPU 0; 3.94 GiB total capacity; 2.98 GiB "
        "already allocated; 14.25 MiB free; 3.00 GiB reserved in total by PyTorch) If reserved memory is >> "
        "allocated memory try setting max_split_size_mb to avoid fragmentation.  See documentation for Memory "
        "Management and PYTORCH_CUDA_ALLOC_CONF",
        "cuda",
        b(2.98, G),
        cuda_other(b(3.94, G), b(14.25, M), b(2.98, G)),
        b(3.94, G),
        b(16.00, M),
    ),
    # --- CUDA, the form since torch 2.1 ---
    (
        "murong-xu/CADS#4",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 22.78 GiB. GPU 0 has a total capacity of "
        "31.47 GiB of which 12.73 GiB is free. Including non-PyTorch memory, this process has 18.73 GiB memory in "
        "use. Of the allocated memory 9.08 GiB is allocated by PyTorch, and 9.35 GiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
        "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        "cuda",
        b(9.08, G),
        cuda_other(b(31.47, G), b(12.73, G), b(9.08, G)),
        b(31.47, G),
        b(22.78, G),
    ),
    (
        "pytorch/pytorch#16417",
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 22.00 MiB. GPU 0 has a total capacity "
        "of 23.65 GiB of which 11.06 MiB is free. Including non-PyTorch memory, this process has 23.60 GiB memory in "
        "use. Of the allocated memory 22.90 GiB is allocated by PyTorch, and 194.87 MiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
        "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        "cuda",
        b(22.90, G),
        cuda_other(b(23.65, G), b(11.06, M), b(22.90, G)),
        b(23.65, G),
        b(22.00, M),
    ),
    (
        # torch 2.1's "capacty"; a process PyTorch names only by PID.
        "FoundationVision/GenerateU#10",
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 496.00 MiB. GPU 0 has a total capacty "
        "of 14.75 GiB of which 235.06 MiB is free. Process 20398 has 14.52 GiB memory in use. Of the allocated "
        "memory 14.06 GiB is allocated by PyTorch, and 330.42 MiB is reserved by PyTorch but unallocated. If "
        "reserved but unallocated memory is large try setting max_split_size_mb to avoid fragmentation.  See "
        "documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF",
        "cuda",
        b(14.06, G),
        cuda_other(b(14.75, G), b(235.06, M), b(14.06, G)),
        b(14.75, G),
        b(496.00, M),
    ),
    (
        "carolchenyx/MGFN.#35",
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.70 GiB. GPU 0 has a total capacty of "
        "6.00 GiB of which 0 bytes is free. Of the allocated memory 2.93 GiB is allocated by PyTorch, and 2.30 GiB "
        "is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and "
        "PYTORCH_CUDA_ALLOC_CONF",
        "cuda",
        b(2.93, G),
        cuda_other(b(6.00, G), 0, b(2.93, G)),
        b(6.00, G),
        b(1.70, G),
    ),
    (
        # The driver reports more free than the request.
        "levihsu/OOTDiffusion#167",
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacty of "
        "4.00 GiB of which 2.80 GiB is free. Of the allocated memory 0 bytes is allocated by PyTorch, and 0 bytes is "
        "reserved by PyTorch but unallocated.",
        "cuda",
        0,
        cuda_other(b(4.00, G), b(2.80, G), 0),
        b(4.00, G),
        b(2.00, G),
    ),
    (
        "wxian3/NeuroLens#2",
        "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 55.57 GiB. GPU 0 has a total capacty of "
        "12.00 GiB of which 9.02 GiB is free. Of the allocated memory 984.52 MiB is allocated by PyTorch, and 463.48 "
        "MiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
        "max_split_size_mb to avoid fragmentation.  See documentation for Memory Management and "
        "PYTORCH_CUDA_ALLOC_CONF",
        "cuda",
        b(984.52, M),
        cuda_other(b(12.00, G), b(9.02, G), b(984.52, M)),
        b(12.00, G),
        b(55.57, G),
    ),
    (
        "kohya-ss/sd-scripts#2029",
        "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.99 GiB. GPU 0 has a total capacity "
        "of 23.56 GiB of which 1.23 GiB is free. Including non-PyTorch memory, this process has 22.27 GiB memory in "
        "use. Of the allocated memory 14.73 GiB is allocated by PyTorch, and 6.39 GiB is reserved by PyTorch but "
        "unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
        "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        "cuda",
        b(14.73, G),
        cuda_other(b(23.56, G), b(1.23, G), b(14.73, G)),
        b(23.56, G),
        b(1.99, G),
    ),
    (
        # ROCm, under set_per_process_memory_fraction ("N allowed;"), with CUDA-graph private pools.
        "ROCm/TheRock#2118",
        "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of 255.98 "
        "GiB of which 244.65 GiB is free. 1.05 GiB allowed; Of the allocated memory 1017.01 MiB is allocated by "
        "PyTorch, with 17.00 MiB allocated in private pools (e.g., HIP Graphs), and 54.99 MiB is reserved by PyTorch "
        "but unallocated. If reserved but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
        "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
        "cuda",
        b(1017.01, M),
        b(54.99, M),
        b(1.05, G),
        b(2.00, M),
    ),
    # --- CPU: DefaultCPUAllocator, POSIX and Windows wordings ---
    (
        "mxfold/mxfold2#20",
        "RuntimeError: [enforce fail at alloc_cpu.cpp:75] err == 0. DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 132426121216 bytes. Error code 12 (Cannot allocate memory)",
        "cpu",
        None,
        None,
        None,
        132426121216,
    ),
    (
        "lllyasviel/Fooocus#237",
        "RuntimeError: [enforce fail at ..\\c10\\core\\impl\\alloc_cpu.cpp:72] data. DefaultCPUAllocator: not enough "
        "memory: you tried to allocate 26214400 bytes.",
        "cpu",
        None,
        None,
        None,
        26214400,
    ),
    (
        # Before alloc_cpu.cpp existed (torch < 1.5).
        "nguyenvanhoang7398/FANG#1",
        "RuntimeError: [enforce fail at CPUAllocator.cpp:64] . DefaultCPUAllocator: can't allocate memory: you tried "
        "to allocate 1178729664 bytes. Error code 12 (Cannot allocate memory)",
        "cpu",
        None,
        None,
        None,
        1178729664,
    ),
    # --- cuBLAS, cuDNN and the CUDA runtime: no sizes printed ---
    (
        "QwenLM/Qwen3#873",
        "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuda",
        None,
        None,
        None,
        None,
    ),
    (
        "open-mmlab/mmaction2#493",
        "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
        "non-contiguous input",
        "cuda",
        None,
        None,
        None,
        None,
    ),
    (
        "kijai/ComfyUI-WanVideoWrapper#565",
        "RuntimeError: CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other "
        "API call, so the stacktrace below might be incorrect.\nFor debugging consider passing "
        "CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
        "cuda",
        None,
        None,
        None,
        None,
    ),
]
CORPUS_IDS = [f"{row[0]}-{i}" for i, row in enumerate(CORPUS)]


def over_by(allocated, other, limit, tried):
    if None in (allocated, other, limit, tried):
        return None
    return allocated + other + tried - limit


@pytest.mark.parametrize(("source", "text", "kind", "allocated", "other", "limit", "tried"), CORPUS, ids=CORPUS_IDS)
def test_every_real_text_is_read_to_the_byte(source, text, kind, allocated, other, limit, tried):
    exp = explain_oom(text)
    got = (exp.kind, exp.allocated_bytes, exp.other_bytes, exp.limit_bytes, exp.tried_bytes, exp.over_by_bytes)
    assert got == (kind, allocated, other, limit, tried, over_by(allocated, other, limit, tried)), source
    assert exp.causes and exp.fixes


def test_the_corpus_covers_every_kind_from_enough_threads():
    assert len(CORPUS) >= 20
    assert {row[2] for row in CORPUS} == {"mps", "cuda", "cpu", "buffer"}


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        # ComfyUI#7440: the MPS pool.
        (CORPUS[0][1], {"pool": "private", "limit_source": "max allowed"}),
        # pinokio#941: the shared pool.
        (CORPUS[4][1], {"pool": "shared"}),
        # pytorch#59778: reserved in total minus already allocated.
        (CORPUS[13][1], {"free_bytes": b(3.03, G), "reserved_unallocated_bytes": b(1.24, G) - b(781.59, M)}),
        # pytorch#16417 (torch 1.0): "cached" is the unallocated cache itself.
        (CORPUS[15][1], {"reserved_unallocated_bytes": b(4.68, M), "limit_source": "total capacity"}),
        # ROCm/TheRock#2118: the fraction's cap is the limit.
        (CORPUS[24][1], {"limit_source": "allowed", "total_bytes": b(255.98, G), "free_bytes": b(244.65, G)}),
    ],
)
def test_the_device_details_are_kept(text, fields):
    data = explain_oom(text).to_dict()
    assert {key: data[key] for key in fields} == fields


def test_mps_without_max_allowed_says_the_limit_was_off():
    # No public thread with this variant was found; the text is tests/oom_texts.py's, from MPSAllocator.mm.
    exp = explain_oom(MPS_UNLIMITED)
    assert (exp.allocated_bytes, exp.other_bytes, exp.tried_bytes) == (b(60.11, G), b(2.01, G), b(1.00, G))
    assert (exp.limit_bytes, exp.over_by_bytes, exp.pool) == (None, None, "shared")
    assert (
        "There is no max allowed: the limit was disabled (PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0), so the Mac swapped "
        "until Metal itself could not allocate." in exp.causes
    )


def test_old_cuda_form_under_a_memory_fraction_uses_the_allowed_cap():
    # CUDACachingAllocator.cpp before torch 2.1 put "N allowed; " between free and reserved; no thread in reach
    # quoted it whole (pytorch/pytorch#111729 quotes "4.77 GiB allowed; 4.74 GiB reserved in total by PyTorch").
    text = (
        "CUDA out of memory. Tried to allocate 64.00 MiB (GPU 0; 11.75 GiB total capacity; 4.60 GiB already "
        "allocated; 6.91 GiB free; 4.77 GiB allowed; 4.74 GiB reserved in total by PyTorch)"
    )
    exp = explain_oom(text)
    assert (exp.limit_bytes, exp.limit_source, exp.allocated_bytes) == (b(4.77, G), "allowed", b(4.60, G))
    assert exp.other_bytes == b(4.74, G) - b(4.60, G)
    assert exp.over_by_bytes == b(4.74, G) + b(64.00, M) - b(4.77, G)


def test_the_mps_causes_carry_the_numbers_and_the_watermark_story():
    exp = explain_oom(CORPUS[0][1])  # ComfyUI#7440
    assert exp.causes == (
        "PyTorch's tensors hold 9.57 GiB (MPS allocated).",
        "Other allocations, 17.35 GiB, are the rest of what Metal holds for this process: the allocator's cache of "
        "freed buffers, MPSGraph's compiled graphs and driver memory.",
        "Other allocations exceed the tensors themselves: cached buffers or graph caches grew, often from input "
        "shapes that change between steps (pytorch/pytorch#132596).",
        "Max allowed, 27.20 GiB, is the high-watermark ratio x the GPU's recommendedMaxWorkingSetSize: with the "
        "default ratio 1.7 that is 16.00 GiB recommended. PYTORCH_MPS_HIGH_WATERMARK_RATIO (or "
        "torch.mps.set_per_process_memory_fraction) sets the ratio, up to 2.0; 0.0 removes the limit and lets the "
        "Mac swap (may cause system failure).",
        "The failed request was 292.50 MiB on the private pool.",
        "Allocated + other + request is 5.78 MiB over the limit.",
    )
    assert exp.fixes[0] == (
        "Find the largest batch size that fits, measured with real training steps: autobatch probe --device mps "
        "--model MODEL --image-size SIZE --memory-limit 27.20GiB"
    )


def test_rounded_sizes_under_the_limit_are_called_rounding():
    exp = explain_oom(CORPUS[9][1])  # Fooocus#1139: 8.89 GB + 172.98 MB + 6.25 MB against 9.07 GB
    assert exp.over_by_bytes < 0
    assert exp.causes[-1] == (
        "Allocated + other + request is within rounding of the limit (5.09 MiB under it as printed): the sizes are "
        "rounded, and the allocator asks for whole blocks."
    )


@pytest.mark.parametrize(
    ("index", "cause"),
    [
        # CADS#4: 9.35 GiB reserved but unallocated on a 31.47 GiB card.
        (
            17,
            "Fragmentation is likely: 9.35 GiB is reserved by PyTorch but unallocated, cached blocks that could not "
            "hold this request. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True lets the cache grow in place "
            "instead (torch still prints this hint when it is already on: pytorch/pytorch#173049).",
        ),
        # GenerateU#10: a PID-named process holds nearly the whole card.
        (
            19,
            "A process PyTorch cannot name as this one holds 14.52 GiB on this GPU (inside a container this run "
            "shows up by its host PID).",
        ),
        # pytorch#16417 (2024): nothing else holds memory; the step simply needs more.
        (18, "A plain overshoot: the step needs more than fits."),
        # NeuroLens#2: one tensor bigger than the GPU.
        (22, "The request alone is larger than the whole GPU (12.00 GiB)."),
        # OOTDiffusion#167: more free than requested.
        (
            21,
            "The driver reported 2.80 GiB free, more than the request: that memory is not in one piece, or another "
            "process took it meanwhile.",
        ),
    ],
)
def test_cuda_causes_tell_fragmentation_other_processes_and_overshoot(index, cause):
    assert cause in explain_oom(CORPUS[index][1]).causes


def test_fragmentation_puts_expandable_segments_first():
    fixes = explain_oom(CORPUS[17][1]).fixes  # CADS#4
    assert fixes[0] == "Set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the environment before the run."
    assert "--channels-last" in fixes[-1]


def test_a_pasted_traceback_is_read_from_the_middle():
    # pytorch/pytorch#130112, the traceback as posted.
    log = (
        " return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass\n"
        "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        "RuntimeError: MPS backend out of memory (MPS allocated: 5.50 GB, other allocations: 14.76 GB, max allowed: "
        "20.40 GB). Tried to allocate 147.24 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable "
        "upper limit for memory allocations (may cause system failure).\n"
        "\n"
        "### Versions\n"
    )
    exp = explain_oom(log)
    assert (exp.kind, exp.allocated_bytes, exp.other_bytes, exp.limit_bytes, exp.tried_bytes) == (
        "mps",
        b(5.50, G),
        b(14.76, G),
        b(20.40, G),
        b(147.24, M),
    )
    assert exp.message.startswith("MPS backend out of memory (MPS allocated: 5.50 GB")


def test_text_that_is_not_an_oom_raises_one_line():
    with pytest.raises(ValueError) as caught:
        explain_oom("RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)")
    assert str(caught.value) == (
        "'RuntimeError: mat1 and mat2 shapes cannot be multiplied (...' is not an out-of-memory error PyTorch "
        "raises. Paste the whole error line or traceback, e.g. 'RuntimeError: MPS backend out of memory (...)'."
    )


@pytest.mark.parametrize("text", [row[1] for row in CORPUS], ids=CORPUS_IDS)
def test_an_exception_explains_like_its_text(text):
    assert explain_oom(RuntimeError(text)) == explain_oom(text)


def test_the_explanation_is_plain_json_data():
    data = explain_oom(CORPUS[0][1]).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert isinstance(data["causes"], list) and isinstance(data["fixes"], list)
    assert isinstance(explain_oom(CORPUS[0][1]), OOMExplanation)


# --- the command ---

SEED = (
    "RuntimeError: MPS backend out of memory (MPS allocated: 45.59 GiB, other allocations: 1.02 GiB, max allowed: "
    "47.74 GiB). Tried to allocate 1.25 GiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable "
    "upper limit for memory allocations (may cause system failure)."
)


@pytest.fixture
def app():
    # A callback keeps `explain` a subcommand (a one-command app would run it bare).
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test app."""

    register(app)
    return app


def test_cli_prints_the_numbers_from_the_text(app):
    result = CliRunner().invoke(app, ["explain", SEED])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:6] == [
        "MPS backend out of memory",
        "  allocated  45.59 GiB  PyTorch's tensors",
        "  other       1.02 GiB  the allocator's cache, MPSGraph and driver memory (other allocations)",
        "  request     1.25 GiB  the allocation that failed, private pool",
        "  limit      47.74 GiB  max allowed",
        "  over by   122.88 MiB  allocated + other + request - limit",
    ]
    assert "  - Allocated + other + request is 122.88 MiB over the limit." in lines
    assert "  1. Find the largest batch size that fits, measured with real training steps: autobatch probe" in lines
    assert result.stderr == ""


def test_cli_json_is_one_document_with_the_exact_numbers(app):
    result = CliRunner().invoke(app, ["explain", "--json", SEED])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {key: data[key] for key in ("kind", "allocated_bytes", "other_bytes", "limit_bytes", "tried_bytes")} == {
        "kind": "mps",
        "allocated_bytes": b(45.59, G),
        "other_bytes": b(1.02, G),
        "limit_bytes": b(47.74, G),
        "tried_bytes": b(1.25, G),
    }
    assert data["over_by_bytes"] == b(45.59, G) + b(1.02, G) + b(1.25, G) - b(47.74, G)
    assert len(data["causes"]) == 5 and len(data["fixes"]) == 5


def test_cli_json_keeps_absent_numbers_as_null(app):
    result = CliRunner().invoke(app, ["explain", "--json", CORPUS[25][1]])  # mxfold2#20, CPU
    data = json.loads(result.stdout)
    assert (data["kind"], data["tried_bytes"]) == ("cpu", 132426121216)
    assert [data[key] for key in ("allocated_bytes", "other_bytes", "limit_bytes", "over_by_bytes")] == [None] * 4


def test_cli_dash_reads_a_log_from_stdin(app):
    log = 'Traceback (most recent call last):\n  File "train.py", line 3, in <module>\n' + CORPUS[17][1] + "\n"
    result = CliRunner().invoke(app, ["explain", "--json", "-"], input=log)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["kind"], data["tried_bytes"], data["reserved_unallocated_bytes"]) == ("cuda", b(22.78, G), b(9.35, G))


def test_cli_not_an_oom_is_one_error_line_and_exit_2(app):
    result = CliRunner().invoke(app, ["explain", "KeyError: 'lr'"])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        "Error: \"KeyError: 'lr'\" is not an out-of-memory error PyTorch raises. Paste the whole error line or "
        "traceback, e.g. 'RuntimeError: MPS backend out of memory (...)'.\n"
    )


def test_cli_empty_stdin_is_a_one_line_hint(app):
    result = CliRunner().invoke(app, ["explain", "-"], input="")
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: Nothing to explain: stdin was empty. Pipe the log in: python train.py 2>&1 | autobatch explain -\n"
    )


def test_no_text_at_a_terminal_is_a_one_line_hint(monkeypatch):
    # CliRunner always gives the command a pipe, so the terminal case is checked on the reader itself.
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("never read"))
    with pytest.raises(_BadInput) as caught:
        _read(None)
    assert str(caught.value) == (
        "Nothing to explain. Pass the error text as an argument, or - to read it from stdin "
        "(autobatch explain - < crash.log)."
    )
