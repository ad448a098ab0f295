"""lightning-dfa: train any LightningModule with Direct Feedback Alignment.

``import lightning_dfa`` imports no Lightning: the names below load on first use, and the "dfa", "dfa_ddp",
"dfa_ddp_spawn" and "dfa_fsdp" strategies are registered as soon as Lightning is imported (now, if it is).
"""

import importlib.abc
import importlib.util
import sys
from importlib import import_module
from typing import Any

from lightning_dfa._lazy import lazy_getattr

_EXPORTS = {
    "DFA": "lightning_dfa.callback",
    "DFAConfig": "lightning_dfa.feedback",
    "FeedbackEngine": "lightning_dfa.feedback",
    "DFAStrategy": "lightning_dfa.strategies",
    "DFADDPStrategy": "lightning_dfa.strategies",
    "DFAFSDPStrategy": "lightning_dfa.strategies",
}
__version__ = "0.1.0"
__all__ = [*_EXPORTS, "__version__"]


__getattr__ = lazy_getattr(__name__, _EXPORTS)


class _RegisterWithLightning(importlib.abc.MetaPathFinder):
    """Imports :mod:`lightning_dfa.strategies` (which registers them) right after ``lightning.pytorch`` loads."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "lightning.pytorch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            load(module)
            import_module("lightning_dfa.strategies")

        spec.loader.exec_module = exec_module
        return spec


if "lightning.pytorch" in sys.modules:
    import_module("lightning_dfa.strategies")
else:
    sys.meta_path.insert(0, _RegisterWithLightning())
