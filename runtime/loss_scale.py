"""Dynamic loss scaling for fp16 steps: the host side of the precision pass's in-graph check.

fp16 gradients underflow below 6e-8 and overflow above 65504. The graph multiplies the
backward seed by `scale`, divides the gradients by it, and reports `found_inf`; an overflowing
step is skipped inside the graph. Here, after each step, the scale backs off on an overflow and
grows after `growth_interval` clean steps in a row — torch.amp.GradScaler's rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LossScaler:
    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    clean_steps: int = 0  # steps since the last overflow or growth
    skipped_steps: int = 0

    def update(self, found_inf: bool) -> None:
        """Move the scale after a step that did (skipped) or did not overflow."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        for key, value in state.items():
            setattr(self, key, type(getattr(self, key))(value))
