"""Training a front end from the black box's answers: one loop, three methods.

- `distill`: fit a local surrogate to the black box's answers, train the front end through it.
- `spsa`: zeroth-order SPSA with gradient correction on the front end's trainable parameters.
- `whitebox`: backprop through a local torch model (the upper bound).
"""

from ..options import METHODS, OBJECTIVES, TrainSettings
from .loop import train

__all__ = ["METHODS", "OBJECTIVES", "TrainSettings", "train"]
