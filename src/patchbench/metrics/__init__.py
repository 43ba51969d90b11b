"""Faithfulness and localisation metrics: pure functions plus the batched harness."""

from dataclasses import dataclass

from patchbench.metrics.faithfulness import (
    Curves,
    Reference,
    faithfulness_curves,
    log_probs,
    prepare_reference,
)
from patchbench.metrics.functional import (
    CURVES,
    auc,
    keep_masks,
    kl_divergence,
    patch_auroc,
    patch_ranking,
    step_counts,
)


@dataclass(frozen=True)
class MetricInfo:
    """How a per-image score reads in a table."""

    label: str
    higher_is_better: bool
    description: str


# Per-image scores; the first is the main score tables are sorted by.
METRICS: dict[str, MetricInfo] = {
    "srg": MetricInfo("SRG", True, "LeRF minus deletion probability AUC (symmetric relevance gain)"),
    "deletion_prob_auc": MetricInfo("Del p", False, "AUC of p(target), most relevant removed first"),
    "insertion_prob_auc": MetricInfo("Ins p", True, "AUC of p(target), most relevant inserted first"),
    "lerf_prob_auc": MetricInfo("LeRF p", True, "AUC of p(target), least relevant removed first"),
    "deletion_kl_auc": MetricInfo("Del KL", True, "AUC of KL(p_clean‖p), most relevant removed first"),
    "insertion_kl_auc": MetricInfo("Ins KL", False, "AUC of KL(p_clean‖p), most relevant inserted first"),
    "lerf_kl_auc": MetricInfo("LeRF KL", False, "AUC of KL(p_clean‖p), least relevant removed first"),
    "auroc": MetricInfo("AUROC", True, "patch AUROC of the map against the ground-truth mask"),
}
MAIN_METRIC = "srg"

__all__ = [
    "CURVES", "MAIN_METRIC", "METRICS", "Curves", "MetricInfo", "Reference", "auc",
    "faithfulness_curves", "keep_masks", "kl_divergence", "log_probs", "patch_auroc",
    "patch_ranking", "prepare_reference", "step_counts",
]
