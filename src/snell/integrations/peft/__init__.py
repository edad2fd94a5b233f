"""SNELL as a peft method: ``peft.get_peft_model(model, SnellPeftConfig(...))``.

How SNELL is registered, and why this way: peft's ``register_peft_method`` only accepts names of its closed
``PeftType`` enum. peft itself dispatches on ``config.peft_type`` through three plain dicts in ``peft.mapping``
(config class, tuner class, parameter prefix) in get_peft_model, save_pretrained, PeftModel.from_pretrained and
load_adapter, so this module adds the key ``"SNELL"`` to those three dicts and changes nothing else in peft.

SNELL's ``peft_type`` is :data:`SNELL`, a :class:`MethodType`: a ``str`` subclass equal to (and hashing as)
``"SNELL"`` that also answers ``.value`` and ``.name`` as a ``PeftType`` member does. peft code that reads
``config.peft_type.value`` (the mixed-model check, hotswap, gradient-checkpointing messages) then works, while the
dict lookups, ``==`` against strings or ``PeftType`` members (a ``str`` enum), JSON (written as ``"SNELL"``) and
``PeftConfig.from_pretrained`` (which reads the plain string back and finds this config class by it) see a string.
The alternative, adding a member to ``PeftType`` by patching the enum's private tables (``_member_map_``,
``_value2member_map_``, ``_member_names_``), would let ``register_peft_method`` accept SNELL, but it changes a
global that all of peft iterates over (every loop over ``PeftType`` would meet a method peft does not know), and
those private tables differ between Python versions: a larger blast radius for the same effect. The route is not
public API (peft 0.20 rejects it), so the peft versions it was tested with are pinned in :data:`SUPPORTED_PEFT` and
checked at import.

The tuner layer wraps the original module as peft's ``base_layer`` and keeps the factors per adapter name.
Its forward and its merge are the core's (:func:`snell.layers.adapted_forward`, :func:`snell.layers.delta_weight`):
there is one implementation of the method, and a peft SNELL adapter computes exactly what
``snell.get_snell_model`` computes with the same factors.

SNELLA through peft: ``kernel="mixk"`` keeps each adapter's trained (α, γ, β) in ``snell_mix`` next to its factors
(trained and saved with them), and :func:`snella_allocator` points a :class:`snell.allocator.SparsityAllocator` at one
adapter of a peft model. What it allocates is written into that adapter's config (``layer_sparsity``) as it goes,
so ``save_pretrained`` records it and ``PeftModel.from_pretrained`` rebuilds the same ΔW.
"""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet

#: The peft versions this integration is tested with; outside them it refuses to import.
SUPPORTED_PEFT = ">=0.21.2,<0.22"


def check_peft_version(version: str) -> None:
    """Raise ImportError unless ``version`` is in :data:`SUPPORTED_PEFT` (the registration relies on peft internals)."""
    if not SpecifierSet(SUPPORTED_PEFT).contains(version, prereleases=True):
        raise ImportError(
            f"snell.integrations.peft supports peft{SUPPORTED_PEFT}, but peft {version} is installed; SNELL "
            f"registers itself through peft's internal lookup tables, which differ between releases. Install a "
            f'supported version: pip install "peft{SUPPORTED_PEFT}"'
        )


check_peft_version(importlib.metadata.version("peft"))

# After the version check: the modules below import names only known to exist in the supported versions.
from peft.mapping import (  # noqa: E402
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)

from snell.integrations.peft.allocation import PeftAdapterSlot, snella_allocator  # noqa: E402
from snell.integrations.peft.config import SNELL, MethodType, SnellPeftConfig  # noqa: E402
from snell.integrations.peft.layer import SnellPeftLayer  # noqa: E402
from snell.integrations.peft.model import SnellPeftModel  # noqa: E402


def _register() -> None:
    """Add SNELL to peft's lookup tables (idempotent; refuses to replace another package's "SNELL")."""
    for table, value in (
        (PEFT_TYPE_TO_CONFIG_MAPPING, SnellPeftConfig),
        (PEFT_TYPE_TO_TUNER_MAPPING, SnellPeftModel),
        (PEFT_TYPE_TO_PREFIX_MAPPING, SnellPeftModel.prefix),
    ):
        existing = table.get(SNELL)
        ours = str(getattr(existing, "__module__", "")).startswith(__name__ + ".")  # this package, reloaded
        if existing is not None and existing != value and not ours:
            raise RuntimeError(f"peft already has a method registered as {SNELL!r}: {existing!r}")
        table[SNELL] = value


_register()

__all__ = [
    "SNELL",
    "SUPPORTED_PEFT",
    "MethodType",
    "PeftAdapterSlot",
    "SnellPeftConfig",
    "SnellPeftLayer",
    "SnellPeftModel",
    "check_peft_version",
    "snella_allocator",
]
