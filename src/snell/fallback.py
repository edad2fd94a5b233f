"""Saying once that a fused path cannot run here: the torch path then does the work, and a warning per layer
and step would drown the log."""

from __future__ import annotations

import warnings

_said: set[str] = set()


def warn_once(kernels: str, reason: str) -> None:
    """One UserWarning per process for ``kernels`` ("fused CPU kernels", "fused Triton kernels")."""
    if kernels not in _said:
        _said.add(kernels)
        warnings.warn(f"snell: {kernels} unavailable ({reason}); using the torch path", stacklevel=3)
