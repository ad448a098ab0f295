"""The Lightning-free feedback engine: its settings, hooks, feedback points, rows and the routing Function."""

from lightning_dfa.feedback.config import MODES, DFAConfig
from lightning_dfa.feedback.engine import FeedbackEngine
from lightning_dfa.feedback.points import auto_output, auto_points, resolve_points

__all__ = ["MODES", "DFAConfig", "FeedbackEngine", "auto_output", "auto_points", "resolve_points"]
