"""The on-disk cache: round trips, what counts as the same key, the limit rule, corrupt files, clearing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mps_autobatch import AutobatchWarning, cache
from mps_autobatch.results import ProbeResult, Trial

GIB = 2**30
MIB = 2**20

KEY = {
    "model": "resnet50",
    "input_shape": [3, 224, 224],
    "num_classes": 101,
    "optimizer": "adamw",
    "amp": True,
    "channels_last": True,
    "steps_per_trial": 2,
    "multiple_of": 8,
    "headroom": 0.2,
    "objective": "max_batch",
    "device_name": "Apple M2 Pro",
    "device_memory_bytes": 32 * GIB,
    "torch": "2.5.1",
    "timm": "1.0.12",
    "mps_autobatch": "0.1.0",
}

# A measure-strategy probe on a 16 GiB limit: 64 and 48 fit the budget, 96 ran out of memory.
RESULT = ProbeResult(
    batch_size=64,
    max_batch_size=80,
    device="mps",
    limit_bytes=16 * GIB,
    limit_source="recommended_max_memory",
    budget_bytes=int(12.8 * GIB),
    headroom=0.2,
    fixed_bytes=1536 * MIB,
    per_sample_bytes=170 * MIB,
    strategy="measure",
    note="",
    steps_per_trial=2,
    requested=128,
    accumulation=(64, 2),
    trials=(
        Trial(48, "ok", 9493 * MIB, 7800 * MIB, 0.412, 116.5, True),
        Trial(96, "oom", None, None, None, None, False, error="MPS backend out of memory"),
        Trial(64, "ok", 12416 * MIB, 10100 * MIB, 0.538, 119.0, True),
        Trial(80, "ok", 15140 * MIB, 12700 * MIB, 0.671, 119.2, False),
    ),
    elapsed_s=41.3,
)


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "autobatch-cache"
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(home))
    return home


def test_cache_dir_follows_the_environment(cache_home: Path) -> None:
    assert cache.cache_dir() == cache_home


def test_store_then_load_round_trips(cache_home: Path) -> None:
    path = cache.store(KEY, RESULT)

    loaded = cache.load(KEY, limit_bytes=16 * GIB)

    assert path == cache_home / f"{cache.fingerprint(KEY)}-{RESULT.limit_bytes}.json"
    assert loaded == RESULT
    assert loaded is not None
    assert isinstance(loaded.trials, tuple) and all(isinstance(t, Trial) for t in loaded.trials)
    assert loaded.accumulation == (64, 2) and isinstance(loaded.accumulation, tuple)
    assert json.loads(path.read_text())["key"] == KEY
    assert [p.name for p in cache_home.iterdir()] == [path.name]  # no temp file left behind


def test_round_trip_without_fit_or_accumulation(cache_home: Path) -> None:
    bisect = ProbeResult(
        batch_size=12,
        max_batch_size=16,
        device="cpu",
        limit_bytes=8 * GIB,
        limit_source="memory_limit",
        budget_bytes=int(6.4 * GIB),
        headroom=0.2,
        fixed_bytes=None,
        per_sample_bytes=None,
        strategy="bisect",
        note="no memory counters on this device",
        steps_per_trial=1,
        requested=None,
        accumulation=None,
        trials=(Trial(16, "ok", None, None, 1.2, 13.3, True),),
        elapsed_s=9.0,
    )
    cache.store(KEY, bisect)

    assert cache.load(KEY, limit_bytes=8 * GIB) == bisect


def test_fingerprint_ignores_key_order() -> None:
    reordered = dict(reversed(list(KEY.items())))

    assert cache.fingerprint(reordered) == cache.fingerprint(KEY)


@pytest.mark.parametrize(
    "change",
    [
        # what the step allocates
        {"optimizer": "sgd"},
        {"amp": False},
        {"input_shape": [3, 256, 256]},
        # where it runs
        {"device_memory_bytes": 16 * GIB},
        {"torch": "2.6.0"},
    ],
)
def test_a_different_key_misses(cache_home: Path, change: dict[str, object]) -> None:
    cache.store(KEY, RESULT)

    assert cache.load({**KEY, **change}, limit_bytes=16 * GIB) is None
    assert cache.load(KEY, limit_bytes=16 * GIB) == RESULT


@pytest.mark.parametrize(
    ("today_limit", "hit"),
    [
        (16 * GIB, True),  # same limit
        (24 * GIB, True),  # more room than when probed: the answer still fits
        (16 * GIB - 1, False),  # less room: the answer may not fit any more
        (12 * GIB, False),
    ],
)
def test_limit_rule(cache_home: Path, today_limit: int, hit: bool) -> None:
    cache.store(KEY, RESULT)

    loaded = cache.load(KEY, limit_bytes=today_limit)

    assert loaded == (RESULT if hit else None)


def test_missing_file_is_a_quiet_miss(cache_home: Path) -> None:
    assert cache.load(KEY, limit_bytes=16 * GIB) is None
    assert not cache_home.exists()


@pytest.mark.parametrize(
    "content",
    [
        '{"key": {"model": "resnet50"}, "result": {"batch_',  # cut off mid-write by an older version
        "null",
        '{"key": {}, "result": {}}',
        "",
    ],
)
def test_corrupt_file_warns_once_and_is_rewritten(cache_home: Path, content: str) -> None:
    path = cache.store(KEY, RESULT)
    path.write_text(content)

    with pytest.warns(AutobatchWarning, match=r"unreadable cache file '.*\.json'.*will be rewritten") as caught:
        loaded = cache.load(KEY, limit_bytes=16 * GIB)

    assert loaded is None
    assert len(caught) == 1
    assert str(path) in str(caught[0].message)
    assert "\n" not in str(caught[0].message)
    assert cache.store(KEY, RESULT) == path
    assert cache.load(KEY, limit_bytes=16 * GIB) == RESULT


def test_clear_counts_and_empties(cache_home: Path) -> None:
    for optimizer in ("adamw", "sgd", "lion"):
        cache.store({**KEY, "optimizer": optimizer}, RESULT)
    (cache_home / f".{cache.fingerprint(KEY)}-{RESULT.limit_bytes}.abc123.tmp").write_text("{")  # a killed store()
    (cache_home / "notes.json").write_text("{}")  # not ours: the folder may be shared

    removed = cache.clear()

    assert removed == 3
    assert sorted(p.name for p in cache_home.iterdir()) == ["notes.json"]
    assert cache.load(KEY, limit_bytes=16 * GIB) is None
    assert cache.clear() == 0


def test_clear_without_a_folder(cache_home: Path) -> None:
    assert cache.clear() == 0


def test_unserializable_key_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"Cannot fingerprint the cache key .*Use only str, int"):
        cache.fingerprint({"model": object()})


def test_an_answer_under_a_smaller_limit_keeps_the_one_found_under_a_larger_limit(cache_home: Path) -> None:
    import dataclasses

    small = dataclasses.replace(RESULT, limit_bytes=RESULT.limit_bytes // 2, batch_size=RESULT.batch_size // 4)
    cache.store(KEY, RESULT)
    cache.store(KEY, small)  # a probe under a tighter limit, which the larger answer could not serve
    assert cache.load(KEY, limit_bytes=RESULT.limit_bytes) == RESULT  # not replaced by the smaller one
    assert cache.load(KEY, limit_bytes=RESULT.limit_bytes - 1) == small
    assert cache.load(KEY, limit_bytes=small.limit_bytes - 1) is None
    assert cache.clear() == 2
