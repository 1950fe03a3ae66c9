"""The caching allocator's books: rounding, pools, reuse within the slack, the cache, the peak."""

from mps_autobatch.allocator import MPS_ALLOCATOR, AllocatorModel, CachingAllocator

KiB, MiB = 2**10, 2**20


def test_small_buffers_round_to_pages_and_large_ones_to_2_mib():
    books = CachingAllocator()
    assert [books.size_class(n) for n in (1, 16 * KiB, 16 * KiB + 1, MiB, MiB + 1, 5 * MiB)] == [
        16 * KiB, 16 * KiB, 32 * KiB, MiB, 2 * MiB, 6 * MiB,
    ]  # fmt: skip
    assert CachingAllocator(AllocatorModel(large_rounding="power_of_two")).size_class(5 * MiB) == 8 * MiB


def test_a_freed_buffer_serves_a_request_of_its_pool_within_the_slack_and_stays_held():
    books = CachingAllocator(MPS_ALLOCATOR)
    big = books.allocate(40 * MiB)
    books.release(big)
    assert (books.live_bytes, books.cached_bytes, books.heap_bytes) == (0, 40 * MiB, 40 * MiB)
    assert books.allocate(5 * MiB).size == 6 * MiB  # 40 MiB is more than 6 MiB + the 32 MiB slack: a new buffer
    reused = books.allocate(9 * MiB)  # within the slack: the cached 40 MiB buffer, counted whole
    assert reused is big and books.live_bytes == 46 * MiB and books.heap_bytes == 46 * MiB
    small = books.allocate(64 * KiB)  # small requests never take a large buffer
    assert small.size == 64 * KiB and books.heap_bytes == 46 * MiB + 64 * KiB


def test_best_fit_reuse_takes_at_most_twice_the_request():
    books = CachingAllocator(AllocatorModel(reuse="best_fit_2x"))
    books.release(books.allocate(20 * MiB))
    assert books.allocate(8 * MiB).size == 8 * MiB  # 20 MiB is more than twice 8 MiB
    assert books.allocate(10 * MiB).size == 20 * MiB


def test_empty_cache_returns_the_cached_buffers_and_the_peak_counts_them():
    books = CachingAllocator()
    kept, freed = books.allocate(2 * MiB), books.allocate(8 * MiB)
    books.release(freed)
    assert books.peak_heap_bytes == 10 * MiB
    books.empty_cache()
    books.reset_peak()
    assert (books.live_bytes, books.heap_bytes, books.peak_heap_bytes) == (kept.size, 2 * MiB, 2 * MiB)
