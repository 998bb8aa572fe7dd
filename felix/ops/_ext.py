"""Loads the C++ extension `felix._C`, or explains why it is missing (the package still works)."""

from __future__ import annotations

import functools
import importlib
import warnings


@functools.lru_cache(maxsize=None)
def load():
    """Return (module, "") or (None, reason). Warns once when the extension is missing."""
    try:
        ext = importlib.import_module("felix._C")
    except ImportError as exc:  # not built, or built for another Python
        reason = (
            f"the C++ extension felix._C is not built ({exc}); CPU ops fall back to the torch "
            "reference. Build it with `pip install -e .` (needs cmake, a C++ compiler, pybind11)"
        )
        warnings.warn(reason, RuntimeWarning, stacklevel=3)
        return None, reason
    return ext, ""
