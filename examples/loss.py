"""Next-token loss for the example models, the function traced together with them."""

import torch.nn.functional as F
from torch import Tensor


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every position: logits [B, T, V], targets [B, T] int64."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
