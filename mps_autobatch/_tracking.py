"""See every tensor storage a block of PyTorch code allocates and frees, from Python.

A `TorchDispatchMode` sees the outputs of every op; each storage it has not seen is booked with
``on_alloc`` and a weak-reference finalizer calls ``on_free`` when the storage dies (PyTorch keeps a
storage's Python object alive exactly as long as the storage). This is how MemTracker counts memory,
and it is what both the CPU backend (exact live-tensor bytes, unlike the noisy resident set) and the
simulated accelerator (a caching allocator on top) are built on.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["StorageBook"]

_PREEXISTING = object()


def _storages(tree: Any) -> Iterator[torch.UntypedStorage]:
    for leaf in tree_iter(tree):
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and leaf.device.type != "meta":
            yield leaf.untyped_storage()


class StorageBook(TorchDispatchMode):
    """Call ``on_alloc(nbytes) -> handle`` for each new storage and ``on_free(handle)`` when it dies.

    Args:
        on_alloc: books a storage of ``nbytes``; may raise (the simulated out-of-memory error).
        on_free: releases what ``on_alloc`` booked.
        adopt_inputs: also book storages that existed before (the first time an op reads them), as a
            device would count a model moved onto it earlier. Without it they are known but not counted,
            so a view of a pre-existing tensor is not mistaken for an allocation.
    """

    def __init__(
        self,
        on_alloc: Callable[[int], object],
        on_free: Callable[[object], None],
        *,
        adopt_inputs: bool,
    ) -> None:
        super().__init__()
        self._on_alloc = on_alloc
        self._on_free = on_free
        self._adopt_inputs = adopt_inputs
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for storage in _storages((args, kwargs)):
            if storage not in self._seen:
                if self._adopt_inputs:
                    self._book(storage)
                else:
                    self._seen[storage] = _PREEXISTING
        out = func(*args, **kwargs)
        for storage in _storages(out):
            if storage not in self._seen:
                self._book(storage)
        return out

    def _book(self, storage: torch.UntypedStorage) -> None:
        handle = self._on_alloc(storage.nbytes())
        self._seen[storage] = handle
        weakref.finalize(storage, self._on_free, handle)
