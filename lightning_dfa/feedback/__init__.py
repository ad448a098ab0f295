"""The Lightning-free feedback engine: hooks, feedback points, rows and the routing Function."""

from lightning_dfa.feedback.engine import MODES, FeedbackEngine
from lightning_dfa.feedback.points import auto_output, auto_points, resolve_points

__all__ = ["MODES", "FeedbackEngine", "auto_output", "auto_points", "resolve_points"]
