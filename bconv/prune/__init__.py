"""COP: correlation-based filter pruning (Wang, Fu, Guo, Cai, He, IJCAI 2019) on any backbone.

Torch-Pruning's dependency graph says which channels are coupled (residual sums,
concatenations, depthwise convolutions) and removes them; bconv decides *which* channels go,
with the importance of the released COP code (see docs/design.md §8):

- redundancy is data-free: for each spatial tap of the kernel that consumes a layer's
  channels, every input channel is a vector over the consumer's filters; the |Pearson|
  correlation of every pair, averaged over the taps, with a zero diagonal, normalised once;
  ``r_i`` is the mean of channel i's ``top_k`` largest correlations;
- cost terms use log2 of the params and FLOPs of the layer and its consumers at their current
  widths: ``imp = alpha (1 - r) + beta (1 - rf) + gamma (1 - rp)``, lowest pruned first;
- selection is greedy and global, one channel at a time; only the rows of the correlation
  matrices that held the cut channel among their top-k, and the cost terms, are recomputed.

As in the released code, the classifier keeps its classes and the channels that feed it are
pruned (``keep_feature_width=True`` keeps the pooled width STD compares). Where bconv departs from
it: coupled layers (every kernel that reads the same channels) average their redundancies; a
channel whose consumer weights are constant (a dead channel) is the most redundant, not the least,
and the other channels' scores stay the released ones; every layer keeps a floor
(:class:`Floors`: ``min_channels``, ``max_fraction``, ``round_to``); the target is met within 2% of the
metric or refused before anything is changed.

The package, one part per file:

- :mod:`.importance`: COP's score (the formulas of docs/design.md §8, computed there only), and
  :class:`COPImportance`, the same score as a Torch-Pruning importance for ``tp.pruner.MetaPruner``;
- :mod:`.planner`: the greedy, global selection over Torch-Pruning's channel groups, and :class:`Floors`;
- :mod:`.adapter`: everything asked of Torch-Pruning (graph, groups, protections, measuring);
- :mod:`.graph`: Torch-Pruning's dependency graph with the traced shapes, for the ops it does not follow;
- :mod:`.attention`: attentions whose forward reads its width from its input, made to run on a pruned stream;
- :mod:`.checkpoint`: :func:`save_pruned` / :func:`load_pruned` on Torch-Pruning's pruning history;
- :mod:`.batchnorm`: :func:`reestimate_batchnorm`, to read after any pruning;
- :mod:`.api`: :func:`cop_prune`, the one-call path; :mod:`.report`: what it returns and raises.
"""

from .api import cop_prune
from .batchnorm import reestimate_batchnorm
from .checkpoint import load_pruned, save_pruned
from .importance import PRESETS, COPImportance
from .planner import Floors
from .report import LayerWidth, PruneError, PruneReport, PruneResult, PruneTargetError, format_report

__all__ = [
    "cop_prune",
    "save_pruned",
    "load_pruned",
    "format_report",
    "PruneResult",
    "PruneReport",
    "LayerWidth",
    "PruneError",
    "PruneTargetError",
    "PRESETS",
    "COPImportance",
    "Floors",
    "reestimate_batchnorm",
]
