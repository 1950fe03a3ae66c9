"""The exact out-of-memory texts PyTorch raises, kept once (REFERENCE.md B, C; MPSAllocator.mm, alloc_cpu.cpp)."""

MPS_LIMITED_GIB = (
    "MPS backend out of memory (MPS allocated: 45.59 GiB, other allocations: 1.23 GiB, max allowed: 47.74 GiB). "
    "Tried to allocate 256.00 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
    "limit for memory allocations (may cause system failure)."
)
MPS_LIMITED_GB = (
    "MPS backend out of memory (MPS allocated: 17.36 GB, other allocations: 613.56 MB, max allowed: 18.13 GB). "
    "Tried to allocate 192.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper "
    "limit for memory allocations (may cause system failure)."
)
MPS_UNLIMITED = (
    "MPS backend out of memory (MPS allocated: 60.11 GiB, other allocations: 2.01 GiB). "
    "Tried to allocate 1.00 GiB on shared pool."
)
MPS_INVALID_BUFFER = "Invalid buffer size: 36.00 GiB"
CUDA_CACHING = (
    "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 GiB of which "
    "3.94 MiB is free. Including non-PyTorch memory, this process has 79.14 GiB memory in use."
)
CUDA_RUNTIME = "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call."
CUBLAS = "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"
CUDNN = "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a non-contiguous input."
CPU_POSIX = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "68719476736 bytes. Error code 12 (Cannot allocate memory)"
)
CPU_WINDOWS = (
    "[enforce fail at C:\\actions-runner\\_work\\pytorch\\pytorch\\c10\\core\\impl\\alloc_cpu.cpp:72] data. "
    "DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes."
)

RUNTIME_OOM_TEXTS = [
    MPS_LIMITED_GIB,
    MPS_LIMITED_GB,
    MPS_UNLIMITED,
    MPS_INVALID_BUFFER,
    CUDA_CACHING,
    CUDA_RUNTIME,
    CUBLAS,
    CUDNN,
    CPU_POSIX,
    CPU_WINDOWS,
]
