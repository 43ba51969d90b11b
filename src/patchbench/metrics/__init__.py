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
    pointing_game,
    relevance_mass,
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
    "pointing_game": MetricInfo("Point", True, "share of images whose top patch is in the ground truth"),
    "relevance_mass": MetricInfo("Mass", True, "share of the (min-shifted) map inside the ground truth"),
}
# Scores that compare a map with the ground truth; they do not depend on a removal operator.
LOCALISATION_METRICS = ("auroc", "pointing_game", "relevance_mass")
MAIN_METRIC = "srg"

__all__ = [
    "CURVES", "LOCALISATION_METRICS", "MAIN_METRIC", "METRICS", "Curves", "MetricInfo", "Reference", "auc",
    "faithfulness_curves", "keep_masks", "kl_divergence", "log_probs", "patch_auroc",
    "patch_ranking", "pointing_game", "prepare_reference", "relevance_mass", "step_counts",
]
