"""lightning-dfa: train any LightningModule with Direct Feedback Alignment.

Example::

    import lightning_dfa  # registers the "dfa", "dfa_ddp", "dfa_ddp_spawn" and "dfa_fsdp" strategies
    trainer = lightning.Trainer(strategy="dfa")
"""

from lightning_dfa.callback import DFA
from lightning_dfa.feedback import FeedbackEngine
from lightning_dfa.strategies import DFADDPStrategy, DFAFSDPStrategy, DFAStrategy, register_strategies

register_strategies()

__version__ = "0.1.0"
__all__ = ["DFA", "DFADDPStrategy", "DFAFSDPStrategy", "DFAStrategy", "FeedbackEngine", "__version__"]
