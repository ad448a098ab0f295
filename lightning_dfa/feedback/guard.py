"""The routing guard: DFA must never train silently as something else.

It follows each forward and backward pass of an attached model as a small state machine:

- ``forward_ran()``: a forward pass reached the output point through the hooks;
- ``router_applied()``: that pass put a router on the output point's output (one more backward is *pending*);
- ``router_ran()``: a backward pass reached the router (the blocks got their feedback; one fewer pending);
- ``other_grad(owner)``: a parameter outside the points got a gradient. In a backward pass that never reaches a
  pending router, the loss did not use the error point's output: the points got no feedback. That is checked
  once, when the pass ends, and raised as an error naming the modules the loss did use;
- ``point_grad(owner)``: a point's parameter got a gradient. Before any forward pass ran the hooks, it is
  backprop (a graph compiled before ``attach``): an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lightning_dfa import _compat


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. when non-reentrant checkpointing recomputes a block)."""
    return _compat.current_graph_task_id() != -1


class RoutingGuard:
    """The routing state of one attachment: ``output`` and ``points`` name the error point and the blocks."""

    def __init__(self, output: str, points: Sequence[str]) -> None:
        self.output, self.points = output, list(points)
        self.forwards = 0  # forward passes through the output point since attach (0: the hooks were bypassed)
        self.pending = 0  # routers applied in forward whose backward has not run yet
        self._router_task = self._unrouted_task = -1  # graph tasks of the last router backward, of a check
        self._loss_used: list[str] = []  # modules that got gradients in a backward pass that ran no router

    def reset(self) -> None:
        """Forget an abandoned forward pass (e.g. one that ran out of memory)."""
        self.pending, self._loss_used = 0, []

    def forward_ran(self) -> None:
        self.forwards += 1

    def router_applied(self) -> None:
        self.pending += 1

    def router_ran(self) -> None:
        self.pending = max(self.pending - 1, 0)
        self._router_task = _compat.current_graph_task_id()

    def point_grad(self, owner: str) -> Callable[..., None]:
        """A gradient hook for a point's parameter, owned by module ``owner``."""

        def hook(param: object) -> None:
            if not self.forwards:
                raise RuntimeError(
                    f"A parameter of {owner!r}, inside a feedback point, received a gradient although no forward pass "
                    "since dfa.attach() ran the DFA hooks: this is backprop, not DFA. A model compiled with "
                    "torch.compile and run before attach() keeps its compiled graph, which bypasses hooks added "
                    "later. Attach first, then compile (dfa.attach(model); model = torch.compile(model)), or call "
                    "torch.compiler.reset() after attach()."
                )

        return hook

    def other_grad(self, owner: str) -> Callable[..., None]:
        """A gradient hook for a parameter outside the points, owned by module ``owner``."""

        def hook(param: object) -> None:
            task = _compat.current_graph_task_id()
            if not self.pending or task == self._router_task:
                return
            if not self._loss_used:  # decide at the end of this backward pass: the router may still run
                self._unrouted_task = task
                _compat.queue_backward_callback(self._check_error_used)
            if owner not in self._loss_used:
                self._loss_used.append(owner)

        return hook

    def _check_error_used(self) -> None:
        used, self._loss_used = self._loss_used, []
        if self._router_task != self._unrouted_task:
            self.pending = 0
            raise RuntimeError(self.unused_error_message(used))

    def check_after_backward(self, used: Callable[[], list[str]]) -> None:
        """Raise if a router is still pending after backward; ``used()`` lists the modules that got gradients."""
        pending, self.pending = self.pending, 0
        if pending:
            raise RuntimeError(self.unused_error_message(used()))

    def unused_error_message(self, used: list[str]) -> str:
        used_text = f"; it used {used}" if used else ""
        return (
            f"The loss does not use the output of the error point {self.output!r}: it got no gradient in this "
            f"backward pass{used_text}. The feedback points {self.points} got no feedback and would not train. "
            "Set output= to the module whose output the loss is computed from"
            + (f" (e.g. output={used[0]!r})" if used else "")
            + f", or compute the loss from {self.output!r}'s output. A forward pass that is not trained on should "
            "run under torch.no_grad()."
        )
