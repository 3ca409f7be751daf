"""Loss-spike and fault monitor: bad steps in a sliding window decide when the driver rolls back.

A step is bad when its loss or gradient is not finite (the step already skipped the update) or, with
`spike_factor > 0`, when its loss exceeds `spike_factor` x the running mean of good losses. `max_bad_steps`
bad steps within `window` steps call for a rollback (`rollback_from` names the window's first bad step).
"""

from __future__ import annotations

import collections
import math


class SpikeMonitor:
    """Counts bad steps (non-finite, or loss > spike_factor x its running mean) in a sliding window."""

    def __init__(self, max_bad_steps: int, window: int, spike_factor: float):
        self.max_bad_steps, self.window, self.spike_factor = max_bad_steps, window, spike_factor
        self.reset()

    def reset(self) -> None:
        self.bad_steps: collections.deque = collections.deque()
        self.ema_loss = None

    def observe(self, step: int, loss: float, nonfinite: bool) -> bool:
        """Records step `step`; True if it was bad."""
        bad = nonfinite or (self.spike_factor > 0 and self.ema_loss is not None
                            and loss > self.spike_factor * self.ema_loss)
        if bad:
            self.bad_steps.append(step)
        elif math.isfinite(loss):
            self.ema_loss = loss if self.ema_loss is None else 0.9 * self.ema_loss + 0.1 * loss
        while self.bad_steps and self.bad_steps[0] <= step - self.window:
            self.bad_steps.popleft()
        return bad

    def rollback_from(self) -> int | None:
        """The first bad step of the window when a rollback is due, else None."""
        return self.bad_steps[0] if len(self.bad_steps) >= self.max_bad_steps else None


__all__ = ["SpikeMonitor"]
