"""Cost counters every method reports, so curves can be drawn against any x-axis papers use."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Costs:
    """Running totals.  UNet passes count images: a CFG call on a batch of 8 is 16 forward passes;
    a pass is counted backward when its output stays in the graph (checkpoint recomputation is
    not counted again)."""

    images: int = 0          # training samples generated (eval samples are not counted)
    reward_queries: int = 0  # images scored by the training reward
    unet_fwd: int = 0
    unet_bwd: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)
