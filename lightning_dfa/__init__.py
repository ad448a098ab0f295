"""lightning-dfa: train any LightningModule with Direct Feedback Alignment.

``import lightning_dfa`` imports Lightning and registers the strategies ``"dfa"``, ``"dfa_ddp"``,
``"dfa_ddp_spawn"`` and ``"dfa_fsdp"``, so ``Trainer(strategy="dfa")`` works after it, in either import order.
"""

from lightning_dfa.callback import DFA
from lightning_dfa.feedback import DFAConfig, FeedbackEngine
from lightning_dfa.strategies import DFADDPStrategy, DFAFSDPStrategy, DFAStrategy

__version__ = "0.1.0"
__all__ = ["DFA", "DFAConfig", "DFADDPStrategy", "DFAFSDPStrategy", "DFAStrategy", "FeedbackEngine", "__version__"]
