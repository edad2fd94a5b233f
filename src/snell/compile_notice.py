"""Saying once that numba is compiling the fused CPU kernels. The first process after an install (and the first
bf16 layer after that) compiles them, about a minute on 2 cores, with nothing else on screen: a training run
looked stuck at its first step. Later processes load them from numba's cache and say nothing."""

from __future__ import annotations

import logging

from numba.core import event

logger = logging.getLogger("snell")


class CompileNotice(event.Listener):
    """A listener for numba's "numba:compile" events (sent only when a function is compiled, not when it is loaded
    from the cache) that logs one warning, at the first compilation of a function of ``module``."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.said = False

    def on_start(self, event: event.Event) -> None:
        if not self.said and getattr(event.data["dispatcher"].py_func, "__module__", None) == self.module:
            self.said = True
            logger.warning(
                "snell: compiling the fused CPU kernels with numba (once per install and dtype, under a minute on "
                "2 cores); later runs load them from numba's cache"
            )

    def on_end(self, event: event.Event) -> None:
        pass


_registered: dict[str, CompileNotice] = {}


def announce_compiles(module: str) -> CompileNotice:
    """The :class:`CompileNotice` of ``module``, registered for the rest of the process at the first call."""
    if module not in _registered:
        _registered[module] = CompileNotice(module)
        event.register("numba:compile", _registered[module])
    return _registered[module]
