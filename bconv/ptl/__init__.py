"""Progressive Transfer Learning (Yu et al., arXiv 1908.02492): a ladder of BConv-Cells beside a backbone.

One part per module, data flowing one way (docs/design.md §3):

- :mod:`.config`: :class:`PTLConfig`, every option declared once;
- :mod:`.ladder`: :class:`PTLLadder`, the paper's equations as a plain module;
- :mod:`.layouts`: how a stage's output becomes the ladder's NCHW map and back;
- :mod:`.adapter`: the hooks that hand the stage outputs to the ladder and write its result back,
  with the checks that run every forward and gradient checkpointing's replay;
- :mod:`.wrapper`: :func:`wrap_with_ptl`, :class:`PTLModel`, :func:`unwrap_ptl`;
- :mod:`.checkpoint`: :func:`load_ptl`; :mod:`.state`: the cells' latent state at model level;
- :mod:`.usage`: :func:`ladder_usage`, what the ladder contributes; :mod:`.plan`: what it adds.
"""

from .checkpoint import load_ptl
from .config import PTLConfig
from .plan import Plan, PlanRow, ptl_plan
from .state import LatentState
from .usage import LadderUsage, ladder_usage
from .ladder import PTLLadder
from .wrapper import PTLModel, unwrap_ptl, wrap_with_ptl

__all__ = [
    "wrap_with_ptl", "unwrap_ptl", "PTLModel", "PTLConfig", "load_ptl", "ladder_usage", "LadderUsage", "LatentState",
    "PTLLadder", "ptl_plan", "Plan", "PlanRow",
]  # fmt: skip
