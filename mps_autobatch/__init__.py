"""mps-autobatch: the largest batch size a PyTorch training step can safely use, measured, not guessed.

The names below load on first use (PEP 562), so ``import mps_autobatch``, and the ``autobatch --help``
that imports it, do not pay for importing torch until something needs it.

Example:
    >>> from mps_autobatch import plan_accumulation
    >>> plan_accumulation(32, 24)
    (16, 2)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes

if TYPE_CHECKING:
    from .accumulation import plan_accumulation as plan_accumulation
    from .errors import AutobatchError as AutobatchError
    from .errors import AutobatchWarning as AutobatchWarning
    from .errors import NoBatchSizeFits as NoBatchSizeFits
    from .explain import OOMExplanation as OOMExplanation
    from .explain import explain_oom as explain_oom
    from .isolate import find_safe_batch_size_isolated as find_safe_batch_size_isolated
    from .levers import Advice as Advice
    from .levers import advise as advise
    from .oom import is_oom_error as is_oom_error
    from .probe import find_safe_batch_size as find_safe_batch_size
    from .results import MemoryBreakdown as MemoryBreakdown
    from .results import ProbeResult as ProbeResult
    from .results import Trial as Trial
    from .spec import ProbeSpec as ProbeSpec

__version__ = "0.1.0"

__all__ = [
    "Advice",
    "AutobatchError",
    "AutobatchWarning",
    "MemoryBreakdown",
    "NoBatchSizeFits",
    "OOMExplanation",
    "ProbeResult",
    "ProbeSpec",
    "Trial",
    "advise",
    "explain_oom",
    "find_safe_batch_size",
    "find_safe_batch_size_isolated",
    "is_oom_error",
    "plan_accumulation",
]

# Where each public name lives.
_HOMES = {
    "Advice": "levers",
    "AutobatchError": "errors",
    "AutobatchWarning": "errors",
    "MemoryBreakdown": "results",
    "NoBatchSizeFits": "errors",
    "OOMExplanation": "explain",
    "ProbeResult": "results",
    "ProbeSpec": "spec",
    "Trial": "results",
    "advise": "levers",
    "explain_oom": "explain",
    "find_safe_batch_size": "probe",
    "find_safe_batch_size_isolated": "isolate",
    "is_oom_error": "oom",
    "plan_accumulation": "accumulation",
}


__getattr__ = lazy_attributes(__name__, _HOMES)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
