"""Remember probe answers on disk, so the same model on the same machine is probed once.

Each answer is one JSON file named after the fingerprint of its key and the limit it was found under (an
answer found under a smaller limit does not replace one found under a larger limit: each serves its own).
The caller builds the key from everything that changes memory use or the answer (model, input shape,
optimizer, amp, device, versions, ...); this module only hashes it, stores
``{"key": key, "result": result.to_dict()}`` and reads it back.

Example:
    >>> import os, tempfile
    >>> from unittest import mock
    >>> from mps_autobatch.results import ProbeResult
    >>> result = ProbeResult(batch_size=8, max_batch_size=10, device="cpu", limit_bytes=100,
    ...     limit_source="memory_limit", budget_bytes=80, headroom=0.2, fixed_bytes=10, per_sample_bytes=8,
    ...     strategy="measure", note="", steps_per_trial=1, requested=None, accumulation=None, trials=(),
    ...     elapsed_s=0.5)
    >>> key = {"model": "resnet18", "optimizer": "adamw"}
    >>> with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"AUTOBATCH_CACHE_DIR": tmp}):
    ...     _ = store(key, result)
    ...     hit, too_big = load(key, limit_bytes=100), load(key, limit_bytes=50)
    ...     removed = clear()
    >>> hit == result, too_big, removed
    (True, None, 1)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import platformdirs

from .errors import AutobatchWarning, first_line
from .results import MemoryBreakdown, ProbeResult, Trial

__all__ = ["cache_dir", "clear", "fingerprint", "load", "result_from_dict", "store"]

_ENV_DIR = "AUTOBATCH_CACHE_DIR"
_NAME = re.compile(r"[0-9a-f]{64}-\d+\.json")
_TEMP_NAME = re.compile(r"\.[0-9a-f]{64}-\d+\.\w+\.tmp")


def cache_dir() -> Path:
    """The folder holding the cache files; it may not exist yet.

    ``$AUTOBATCH_CACHE_DIR`` when set (tests and CI point it at a temporary folder), otherwise the
    platform's user cache folder for "mps-autobatch".

    Example:
        >>> import os
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"AUTOBATCH_CACHE_DIR": "/tmp/ab-cache"}):
        ...     print(cache_dir().as_posix())
        /tmp/ab-cache
    """
    override = os.environ.get(_ENV_DIR)
    return Path(override) if override else Path(platformdirs.user_cache_dir("mps-autobatch"))


def fingerprint(key: Mapping[str, object]) -> str:
    """The sha256 hex digest of the key's canonical JSON, the name of its cache file.

    Keys are sorted and separators fixed, so the same content gives the same fingerprint in any order
    and in any process.

    Args:
        key: JSON-ready values (str, int, float, bool, None, lists and dicts of them).

    Returns:
        64 hex characters.

    Raises:
        TypeError: a value cannot be written as JSON.

    Example:
        >>> a = fingerprint({"model": "resnet18", "amp": True})
        >>> a == fingerprint({"amp": True, "model": "resnet18"}), len(a)
        (True, 64)
        >>> a == fingerprint({"model": "resnet18", "amp": False})
        False
    """
    try:
        text = json.dumps(dict(key), sort_keys=True, separators=(",", ":"))
    except TypeError as exc:
        raise TypeError(
            f"Cannot fingerprint the cache key {dict(key)!r}: {exc}. Use only str, int, float, bool, None, "
            "lists and dicts in the key."
        ) from exc
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _path_for(key: Mapping[str, object], limit_bytes: int, folder: Path | None) -> Path:
    return (folder if folder is not None else cache_dir()) / f"{fingerprint(key)}-{limit_bytes}.json"


def _best_path(key: Mapping[str, object], limit_bytes: int, folder: Path | None) -> Path | None:
    """The answer found under the largest limit no larger than ``limit_bytes``: the largest batch still safe."""
    home = folder if folder is not None else cache_dir()
    prefix = f"{fingerprint(key)}-"
    limits = [
        int(path.name[len(prefix) : -len(".json")])
        for path in home.glob(f"{prefix}*.json")
        if _NAME.fullmatch(path.name)
    ]
    fitting = [limit for limit in limits if limit <= limit_bytes]
    return _path_for(key, max(fitting), folder) if fitting else None


def result_from_dict(data: Mapping[str, Any]) -> ProbeResult:
    """Rebuild a `ProbeResult` from `ProbeResult.to_dict` output (after a JSON round trip).

    JSON turns tuples into lists; this turns them back, so the rebuilt result equals the original.

    Raises:
        TypeError, KeyError: the data is not a serialized `ProbeResult`.

    Example:
        >>> import json
        >>> trial = Trial(8, "ok", 90, 60, 0.1, 80.0, False)
        >>> r = ProbeResult(batch_size=4, max_batch_size=8, device="cpu", limit_bytes=100,
        ...     limit_source="memory_limit", budget_bytes=80, headroom=0.2, fixed_bytes=None, per_sample_bytes=None,
        ...     strategy="bisect", note="", steps_per_trial=1, requested=16, accumulation=(4, 4), trials=(trial,),
        ...     elapsed_s=0.5)
        >>> result_from_dict(json.loads(json.dumps(r.to_dict()))) == r
        True
    """
    fields = dict(data)
    fields["trials"] = tuple(Trial(**trial) for trial in data["trials"])
    accumulation = data["accumulation"]
    fields["accumulation"] = None if accumulation is None else (int(accumulation[0]), int(accumulation[1]))
    fields["throughput"] = tuple((int(size), float(rate)) for size, rate in data.get("throughput", ()))
    if data.get("breakdown") is not None:
        fields["breakdown"] = MemoryBreakdown(**data["breakdown"])
    return ProbeResult(**fields)


def load(key: Mapping[str, object], limit_bytes: int, *, folder: Path | None = None) -> ProbeResult | None:
    """The cached answer for ``key``, if there is one that is still safe under today's limit.

    An answer found under a limit larger than today's may not fit any more, so it is a miss; one found
    under a smaller or equal limit still fits (a larger limit only leaves more room).

    Args:
        key: the same mapping that was passed to `store`.
        limit_bytes: the memory limit the caller will run under now.
        folder: the cache folder (default `cache_dir`).

    Returns:
        The cached `ProbeResult`, or None on a miss. A corrupt or unreadable file is a miss too, with an
        `AutobatchWarning`; the next `store` for the key rewrites it.
    """
    path = _best_path(key, limit_bytes, folder)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["key"] != json.loads(json.dumps(dict(key))):
            raise ValueError("its key does not match its name")
        result = result_from_dict(data["result"])
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        reason = first_line(exc)
        warnings.warn(
            f"Ignoring unreadable cache file '{path}' ({reason}); it will be rewritten after this probe.",
            AutobatchWarning,
            stacklevel=2,
        )
        return None
    return result if result.limit_bytes <= limit_bytes else None


def store(key: Mapping[str, object], result: ProbeResult, *, folder: Path | None = None) -> Path:
    """Save ``result`` under ``key`` and its limit, replacing an earlier answer found under the same limit.

    The file is written next to its final name and moved into place with `os.replace`, so a reader
    never sees half a file, even if the process dies while writing.

    Returns:
        The path of the cache file.
    """
    path = _path_for(key, result.limit_bytes, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {**result.to_dict(), "cached": False}  # read back, it is a cached answer; stored, it was measured
    text = json.dumps({"key": dict(key), "result": stored}, indent=2, sort_keys=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    temp = Path(name)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def clear() -> int:
    """Remove every cached answer (and temporary files left by an interrupted `store`).

    Returns:
        How many cached answers were removed.
    """
    folder = cache_dir()
    if not folder.is_dir():
        return 0
    removed = 0
    # Only names store() writes: $AUTOBATCH_CACHE_DIR may point at a folder shared with other files.
    for path in folder.iterdir():
        if _NAME.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed += 1
        elif _TEMP_NAME.fullmatch(path.name):
            path.unlink(missing_ok=True)
    return removed
