"""One score registry: each per-image score declared once (label, direction, family, tolerance,
function); tables, the regression check and the report read it, and a plugin can add one."""

import json

import pandas as pd
import pytest
import torch

from patchbench import cli
from patchbench.bench.regress import tolerances
from patchbench.metrics import SCORES, auc, faithfulness_curves, prepare_reference
from patchbench.metrics.faithfulness import Curves
from patchbench.metrics.scores import score, scores
from patchbench.models import create_operator


def test_every_score_is_fully_declared():
    names = [s.name for s in scores()]
    assert names[:1] == ["srg"] and len(names) == len(set(names)) == 19
    for s in scores():
        assert s.label and s.description and s.family in ("faithfulness", "localisation")
        assert s.tolerance > 0 and isinstance(s.higher_is_better, bool)
    assert {s.name for s in scores("localisation")} == {"auroc", "pointing_game", "relevance_mass"}
    # shown by default: SRG and the deletion and LeRF AUCs of p and KL (LeRF = insertion)
    assert [s.name for s in scores("faithfulness") if s.column] == [
        "srg", "deletion_prob_auc", "lerf_prob_auc", "deletion_kl_auc", "lerf_kl_auc"]
    units = {s.name: s.unit for s in scores()}
    assert units["srg"] == "p" and units["deletion_kl_auc"] == "nats" and units["srg_logit"] == "logit"
    assert units["chefer_negative"] == "acc × 100" and units["auroc"] == ""
    with pytest.raises(Exception, match="Did you mean 'srg'"):
        score("sgr")


def test_faithfulness_scores_against_the_curves_by_hand(tiny, no_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    maps = torch.rand(3, 4, 4, generator=g)
    target = tiny.logits(x).argmax(1)
    op = create_operator("mean")
    c = faithfulness_curves(tiny, op, x, target, maps, prepare_reference(tiny, op, x, torch.arange(3)),
                            steps=4)
    got = c.scores()
    for curve in ("deletion", "insertion", "lerf"):
        torch.testing.assert_close(got[f"{curve}_prob_auc"], auc(c.x, c.prob[curve]))
        torch.testing.assert_close(got[f"{curve}_kl_auc"], auc(c.x, c.kl[curve]))
    torch.testing.assert_close(got["srg"], got["lerf_prob_auc"] - got["deletion_prob_auc"])
    only = Curves(c.x, *({"deletion": getattr(c, q)["deletion"]} for q in ("prob", "kl", "logit", "correct")))
    assert set(only.scores()) == {"deletion_prob_auc", "deletion_kl_auc", "deletion_logit_auc",
                                  "deletion_correct_auc", "chefer_positive"}  # SRG needs LeRF


PLUGIN = """\
from patchbench.metrics import auc, register_score


@register_score("late_drop", "Late", False, "faithfulness", 0.2,
                "p(target) at the last interior point of the deletion curve", curves=("deletion",))
def late_drop(c):
    return c.prob["deletion"][:, -2]
"""


def test_a_plugin_score_is_one_file(tmp_path, glyphs_model, one_thread, capsys):
    plugin = tmp_path / "late.py"
    plugin.write_text(PLUGIN)
    try:
        code = cli.main(["bench", "--plugin", str(plugin), "--run", "s", "--results-dir", str(tmp_path),
                         "--datasets", "glyphs", "--methods", "random,rollout", "--operators", "mean",
                         "--n-images", "6", "--steps", "4", "--sanity-images", "0", "--quiet"])
        assert code == 0 and "warning" not in capsys.readouterr().err
        assert tolerances()["late_drop"] == 0.2
    finally:
        SCORES.unregister("late_drop")
    run = tmp_path / "s"
    scores_df = pd.read_csv(run / "scores.csv")
    late = scores_df[scores_df.metric == "late_drop"]
    assert len(late) == 12  # 2 methods x 6 images
    curves = pd.read_csv(run / "curves.csv.gz")
    deletion = curves[(curves.curve == "deletion") & (curves.quantity == "prob") & (curves.step == 3)]
    merged = late.merge(deletion, on=["method", "sample_id"])
    assert len(merged) == 12 and (merged.value_x - merged.value_y).abs().max() < 1e-5
    assert "Late ↓" in (run / "leaderboard.md").read_text()
    assert "late_drop" in pd.read_csv(run / "leaderboard.csv").columns
    assert json.loads((run / "run.json").read_text())["plugin_problems"] == []
