"""See every tensor storage a block of PyTorch code allocates and frees, from Python.

A `TorchDispatchMode` sees the outputs of every op; each storage it has not seen is booked with
``on_alloc`` and a weak-reference finalizer calls ``on_free`` when the storage dies (PyTorch keeps a
storage's Python object alive exactly as long as the storage). This is how MemTracker counts memory,
and it is what both the CPU backend (exact live-tensor bytes, unlike the noisy resident set) and the
simulated accelerator (a caching allocator on top) are built on.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["StorageBook"]

_PREEXISTING = object()


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    for leaf in tree_iter(tree):
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and leaf.device.type != "meta":
            yield leaf


def _storages(tree: Any) -> Iterator[torch.UntypedStorage]:
    for tensor in _tensors(tree):
        yield tensor.untyped_storage()


def _resident(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> set[int]:
    """Ids of the input storages that live on the device: parameters, and what the op writes in place."""
    ids = {id(t.untyped_storage()) for t in _tensors((args, kwargs)) if t.requires_grad and t.is_leaf}
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        ids |= {id(storage) for storage in _storages(value)}
    return ids


class StorageBook(TorchDispatchMode):
    """Call ``on_alloc(nbytes) -> handle`` for each new storage and ``on_free(handle)`` when it dies.

    Args:
        on_alloc: books a storage of ``nbytes``; may raise (the simulated out-of-memory error).
        on_free: releases what ``on_alloc`` booked.
        adopt_inputs: which storages that existed before are booked, the first time an op uses them:
            "all" (the CPU: a process's RAM holds everything it touches); "resident" (a device: only
            what lives on it, a training step's state: parameters, which require grad, what an op writes
            in place, such as optimizer state, and what `mark_resident` names, such as the buffers of a
            module that runs; host data the step only reads, like a dataset tensor it indexes, is not
            device memory); "none". What is not booked
            is known, so a view of a pre-existing tensor is not mistaken for an allocation.
        seen: the storages booked so far, shared between books of one device: a storage booked by an earlier
            book (a parameter adopted in an earlier probe) is still booked, so it is not booked twice.
    """

    def __init__(
        self,
        on_alloc: Callable[[int], object],
        on_free: Callable[[Any], None],
        *,
        adopt_inputs: Literal["all", "resident", "none"],
        seen: WeakIdKeyDictionary | None = None,
    ) -> None:
        super().__init__()
        self._on_alloc = on_alloc
        self._on_free = on_free
        self._adopt_inputs = adopt_inputs
        self._seen: WeakIdKeyDictionary = seen if seen is not None else WeakIdKeyDictionary()
        self._marked: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storages known to live on the device

    def mark_resident(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count these tensors as device memory from their next use (a module's parameters and buffers)."""
        for storage in _storages(list(tensors)):
            self._marked[storage] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        resident = _resident(func, args, kwargs) if self._adopt_inputs == "resident" else set()
        for tensor in _tensors((args, kwargs)):
            storage = tensor.untyped_storage()
            seen = self._seen.get(storage)
            on_device = id(storage) in resident or storage in self._marked
            if seen is None or (seen is _PREEXISTING and on_device):
                if self._adopt_inputs == "all" or (self._adopt_inputs == "resident" and on_device):
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
