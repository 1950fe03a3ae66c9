"""mps-autobatch: the largest batch size a PyTorch training step can safely use, measured, not guessed.

Example:
    >>> from mps_autobatch import plan_accumulation
    >>> plan_accumulation(32, 24)
    (16, 2)
"""

from .accumulation import plan_accumulation as plan_accumulation
from .errors import AutobatchError as AutobatchError
from .errors import AutobatchWarning as AutobatchWarning
from .errors import NoBatchSizeFits as NoBatchSizeFits
from .explain import OOMExplanation as OOMExplanation
from .explain import explain_oom as explain_oom
from .isolate import find_safe_batch_size_isolated as find_safe_batch_size_isolated
from .oom import is_oom_error as is_oom_error
from .probe import find_safe_batch_size as find_safe_batch_size
from .results import ProbeResult as ProbeResult
from .results import Trial as Trial
from .spec import ProbeSpec as ProbeSpec

__version__ = "0.1.0"

__all__ = [
    "AutobatchError",
    "AutobatchWarning",
    "NoBatchSizeFits",
    "OOMExplanation",
    "ProbeResult",
    "ProbeSpec",
    "Trial",
    "explain_oom",
    "find_safe_batch_size",
    "find_safe_batch_size_isolated",
    "is_oom_error",
    "plan_accumulation",
]
