"""Preference-optimization objectives as pure tensor functions over per-sequence log-probs.

``OBJECTIVES`` maps a name to an :class:`~tunegraph.training.objectives.base.Objective`: the function
and what a trainer must feed it (reference log-probs, averaged or summed log-probs, paired or
unpaired batches, the chosen NLL). Each function is checked against TRL 1.16 in
``tests/test_objectives.py``.
"""

from tunegraph.training.objectives.base import OBJECTIVES, Objective, PreferenceLoss, get_objective
from tunegraph.training.objectives.cpo import cpo_loss
from tunegraph.training.objectives.dpo import dpo_loss, ipo_loss
from tunegraph.training.objectives.kto import kto_loss, kto_reference_point
from tunegraph.training.objectives.logps import sequence_logps, token_mean_nll
from tunegraph.training.objectives.orpo import orpo_loss
from tunegraph.training.objectives.simpo import simpo_loss

__all__ = [
    "OBJECTIVES", "Objective", "PreferenceLoss", "get_objective", "sequence_logps", "token_mean_nll",
    "dpo_loss", "ipo_loss", "simpo_loss", "cpo_loss", "orpo_loss", "kto_loss", "kto_reference_point",
]
