"""Min-Sum (Shejwalkar and Houmansadr, NDSS 2021, "Manipulating the Byzantine")."""

from __future__ import annotations

from torch import Tensor

from attacks.base import ATTACKS
from attacks.min_max import OptimisedPerturbation, squared_distances


@ATTACKS.register("min_sum")
class MinSum(OptimisedPerturbation):
    """Min-Sum: ``malicious = mean + gamma * nabla_p`` with the largest gamma such that
    ``sum_i ||m - g_i||^2 <= max_i sum_j ||g_i - g_j||^2`` over the reference updates g (the
    paper's condition: the malicious update's summed squared distance is no larger than
    that of the most outlying reference update). Distances in float64; search, options
    and knowledge as :class:`attacks.min_max.OptimisedPerturbation`."""

    def accepts(self, candidate: Tensor, reference: Tensor) -> bool:
        worst = squared_distances(reference, reference).sum(dim=1).max()
        return bool(squared_distances(candidate.unsqueeze(0), reference).sum() <= worst)
