"""The per-image scores, each declared once: name, label, direction, family, regression
tolerance, and the function. Tables, the regression check and the report read them from here.

A score of the ``faithfulness`` family is a function of an image's curves (:class:`Curves`,
under one removal operator); a ``localisation`` score compares a map with the ground-truth
mask and does not depend on an operator. Adding a score is one function with
``@register_score(...)``, here or in a plugin.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from patchbench.metrics.functional import CURVES, auc, patch_auroc, pointing_game, relevance_mass
from patchbench.registry import Registry

if TYPE_CHECKING:
    from patchbench.metrics.faithfulness import Curves

FAMILIES = ("faithfulness", "localisation")


@dataclass(frozen=True)
class Score:
    """One per-image score.

    Attributes:
        name: Registry name, the ``metric`` column of ``scores.csv``.
        label: Short column header.
        higher_is_better: Its direction (↑ or ↓ in every header).
        family: ``faithfulness`` (``fn(curves) -> [B]``) or ``localisation``
            (``fn(maps [B, Hp, Wp], truth [B, Hp, Wp] bool) -> [B]``).
        tolerance: How far its mean may move in the regression check: twice the largest shift
            measured when models are retrained on another machine (docs/regression.md).
        description: One line for people.
        fn: Computes it per image.
        curves: The curves a faithfulness score needs (it is skipped without them).
        column: Shown as a leaderboard column by default (insertion AUCs equal LeRF's and
            are not; a run's ``scores`` chooses others).
        unit: What the score is in, shown in the column header (AUCs integrate it over the
            fraction of patches removed); "" for a unitless score.
    """

    name: str
    label: str
    higher_is_better: bool
    family: str
    tolerance: float
    description: str
    fn: Callable[..., Tensor]
    curves: tuple[str, ...] = ()
    column: bool = True
    unit: str = ""


SCORES: Registry[Score] = Registry("score")  # name -> Score
MAIN_SCORE = "srg"  # tables are sorted by it


def register_score(name: str, label: str, higher_is_better: bool, family: str, tolerance: float,
                   description: str, curves: tuple[str, ...] = (), column: bool = True, unit: str = ""
                   ) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Declares the decorated function as the per-image score ``name`` (see :class:`Score`)."""
    if family not in FAMILIES:
        raise ValueError(f"score {name!r}: family must be one of {', '.join(FAMILIES)}, got {family!r}")

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        SCORES.register(name)(Score(name, label, higher_is_better, family, float(tolerance),
                                    description, fn, tuple(curves), column, unit))
        return fn

    return decorator


def score(name: str) -> Score:
    """The declared score ``name`` (unknown names list the valid ones)."""
    return SCORES.get(name)


def scores(family: str | None = None) -> list[Score]:
    """Every declared score, in declaration order (the order of tables and of ``scores.csv``),
    optionally of one family."""
    return [s for s in SCORES.values() if family is None or s.family == family]


def shown(family: str, selection: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The scores of ``family`` a table shows as columns: those of ``selection`` in its order,
    or, without a selection, those declared as columns."""
    if selection:
        return [n for n in selection if score(n).family == family]
    return [s.name for s in scores(family) if s.column]


def faithfulness_scores(c: Curves) -> dict[str, Tensor]:
    """Every faithfulness score whose curves ``c`` has, per image ``[B]``."""
    return {s.name: s.fn(c) for s in scores("faithfulness") if all(k in c.prob for k in s.curves)}


def localisation_scores(maps: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """Every localisation score of ``maps`` ``[B, Hp, Wp]`` against ``truth``, per image ``[B]``."""
    return {s.name: s.fn(maps, truth) for s in scores("localisation")}


# ---- the built-in scores --------------------------------------------------------------------------

register_score("srg", "SRG", True, "faithfulness", 0.22,
               "LeRF minus deletion probability AUC (symmetric relevance gain)",
               curves=("lerf", "deletion"), unit="p")(
    lambda c: auc(c.x, c.prob["lerf"]) - auc(c.x, c.prob["deletion"]))

# quantity -> label, unit, regression tolerance; logit and correct: provisional tolerances,
# scaled from p's by their range, not yet measured across machines (docs/regression.md)
_QUANTITY = {"prob": ("p", "p", 0.15), "kl": ("KL", "nats", 1.2), "logit": ("logit", "logit", 2.0),
             "correct": ("acc", "acc", 0.2)}
_CURVE = {"deletion": ("Del", "most relevant removed first"),
          "insertion": ("Ins", "most relevant inserted first"),
          "lerf": ("LeRF", "least relevant removed first")}
for _quantity, (_name, _unit, _tol) in _QUANTITY.items():
    for _curve, (_short, _text) in _CURVE.items():
        assert _curve in CURVES
        # higher is better when the curve should stay up: deletion KL, or LeRF/insertion otherwise
        _up = (_curve != "deletion") != (_quantity == "kl")
        register_score(f"{_curve}_{_quantity}_auc", f"{_short} {_name}", _up, "faithfulness", _tol,
                       f"AUC of {_name} ({_unit}), {_text}", curves=(_curve,),
                       column=_curve != "insertion" and _quantity in ("prob", "kl"), unit=_unit)(
            lambda c, k=_curve, q=_quantity: auc(c.x, getattr(c, q)[k]))

register_score("srg_logit", "SRG logit", True, "faithfulness", 3.0,
               "LeRF minus deletion AUC of the target's logit: AttnLRP's area between the "
               "least- and most-relevant-first curves", curves=("lerf", "deletion"), column=False,
               unit="logit")(
    lambda c: auc(c.x, c.logit["lerf"]) - auc(c.x, c.logit["deletion"]))
register_score("chefer_positive", "Pos. pert.", False, "faithfulness", 20.0,
               "Chefer et al.'s positive perturbation: 100 x the AUC of top-1 accuracy over "
               "0-90% removed, most relevant first", curves=("deletion",), column=False,
               unit="acc × 100")(lambda c: 100 * auc(c.x, c.correct["deletion"], upto=0.9))
register_score("chefer_negative", "Neg. pert.", True, "faithfulness", 20.0,
               "Chefer et al.'s negative perturbation: 100 x the AUC of top-1 accuracy over "
               "0-90% removed, least relevant first", curves=("lerf",), column=False,
               unit="acc × 100")(lambda c: 100 * auc(c.x, c.correct["lerf"], upto=0.9))

register_score("auroc", "AUROC", True, "localisation", 0.18,
               "patch AUROC of the map against the ground-truth mask")(patch_auroc)
register_score("pointing_game", "Point", True, "localisation", 0.34,
               "share of images whose top patch is in the ground truth", unit="share")(pointing_game)
register_score("relevance_mass", "Mass", True, "localisation", 0.16,
               "share of the (min-shifted) map inside the ground truth", unit="share")(relevance_mass)
