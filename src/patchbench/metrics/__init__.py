"""Faithfulness and localisation metrics: pure functions plus the batched harness."""

from patchbench.metrics.faithfulness import (
    Curves,
    Reference,
    clean_logits,
    faithfulness_curves,
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
from patchbench.metrics.scores import (
    MAIN_SCORE,
    SCORES,
    Score,
    faithfulness_scores,
    localisation_scores,
    register_score,
    scores,
)

__all__ = [
    "CURVES", "MAIN_SCORE", "SCORES", "Curves", "Reference", "Score",
    "auc", "faithfulness_scores", "localisation_scores", "register_score", "scores",
    "faithfulness_curves", "keep_masks", "kl_divergence", "clean_logits", "patch_auroc",
    "patch_ranking", "pointing_game", "prepare_reference", "relevance_mass", "step_counts",
]
