"""Lightning callbacks of lightning-dfa: diagnostics, run history and the optical cost ledger."""

from lightning_dfa.callbacks.alignment import Alignment
from lightning_dfa.callbacks.feedback_stats import FeedbackStats
from lightning_dfa.callbacks.history import History, plot_history
from lightning_dfa.callbacks.optical_ledger import OpticalLedger

__all__ = ["Alignment", "FeedbackStats", "History", "OpticalLedger", "plot_history"]
