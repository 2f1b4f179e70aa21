"""Geo-distributed, carbon-aware training on torch.distributed (the `federated` config group).

`DataParallel` (federated=ddp) and `GeoTraining` (federated=geo) are loop policies; the math they use
(top-k with error feedback, work-weighted averaging, the participation rule) is in `core`, the checks in
`config`, process start-up in `launch`.
"""

from greenstack.federated.config import Region, check_federated, parse_regions, rank_regions
from greenstack.federated.core import (
    OuterOptimizer,
    ParticipationRule,
    decide_participation,
    topk_with_error_feedback,
    weighted_dense_average,
    weighted_sparse_average,
)
from greenstack.federated.policy import DataParallel, GeoTraining

__all__ = [
    "DataParallel",
    "GeoTraining",
    "OuterOptimizer",
    "ParticipationRule",
    "Region",
    "check_federated",
    "decide_participation",
    "parse_regions",
    "rank_regions",
    "topk_with_error_feedback",
    "weighted_dense_average",
    "weighted_sparse_average",
]
