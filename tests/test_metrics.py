"""Metric functions and the batched harness against slow, obviously correct references."""

import math

import pytest
import torch

from patchbench.metrics import (
    CURVES,
    auc,
    faithfulness_curves,
    keep_masks,
    kl_divergence,
    patch_auroc,
    patch_ranking,
    prepare_reference,
    step_counts,
)
from patchbench.models import create_operator

TOL = 1e-4  # float32 forward passes in different batch shapes


def test_ranking_breaks_ties_by_patch_index():
    maps = torch.tensor([[1.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    assert patch_ranking(maps).tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]]
    maps2d = torch.tensor([[[3.0, 1.0], [2.0, 1.0]]])
    assert patch_ranking(maps2d).tolist() == [[0, 2, 1, 3]]


@pytest.mark.parametrize("p", [1, 2, 7, 36, 64, 196])
def test_step_counts_symmetric_and_complete(p):
    for s in [*range(1, min(p, 40) + 1), None]:
        c = step_counts(p, s)
        assert c[0] == 0 and c[-1] == p
        assert bool((c.diff() > 0).all())
        assert torch.equal(c.flip(0), p - c)
        assert len(c) - 1 == (p if s is None else s + (s % 2 == 0 and p % 2 == 1))


def test_keep_masks_remove_the_right_patches():
    maps = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7]])
    rank = patch_ranking(maps)
    counts = torch.tensor([0, 2, 5])
    dele = keep_masks(rank, counts, "deletion")[0]
    ins = keep_masks(rank, counts, "insertion")[0]
    lerf = keep_masks(rank, counts, "lerf")[0]
    assert dele.tolist()[1] == [True, False, True, True, False]      # 0.9, 0.7 removed
    assert ins.tolist()[1] == [False, True, False, False, True]      # 0.9, 0.7 kept
    assert lerf.tolist()[1] == [False, True, True, False, True]      # 0.1, 0.3 removed
    assert dele[0].all() and not dele[2].any() and not ins[0].any() and ins[2].all()
    with pytest.raises(ValueError, match="valid curves"):
        keep_masks(rank, counts, "morf")


def test_kl_matches_definition():
    torch.manual_seed(0)
    a, b = torch.randn(6, 9).log_softmax(-1), torch.randn(6, 9).log_softmax(-1)
    slow = [sum(math.exp(a[i, k]) * (a[i, k] - b[i, k]) for k in range(9)) for i in range(6)]
    assert torch.allclose(kl_divergence(a, b), torch.tensor(slow), atol=1e-6)
    assert torch.all(kl_divergence(a, a) == 0)


def test_auc_trapezoid_on_fraction_axis():
    for p, s in [(64, 16), (64, None), (36, 7), (196, 28)]:
        x = step_counts(p, s).float() / p
        assert auc(x, x).item() == pytest.approx(0.5, abs=1e-6)  # independent of the steps
        y = torch.rand(len(x))
        slow = sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))
        assert auc(x, y).item() == pytest.approx(float(slow), abs=1e-6)


def test_patch_auroc_matches_pairwise_count():
    torch.manual_seed(1)
    maps = torch.randint(0, 4, (5, 12)).float()  # many ties
    truth = torch.rand(5, 12) > 0.6
    truth[0] = False  # undefined
    got = patch_auroc(maps, truth)
    assert math.isnan(got[0])
    for i in range(1, 5):
        pos = [maps[i, j] for j in range(12) if truth[i, j]]
        neg = [maps[i, j] for j in range(12) if not truth[i, j]]
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
        assert got[i].item() == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-6)
    perfect = patch_auroc(truth[1:].float(), truth[1:])
    assert torch.allclose(perfect, torch.ones(4))


def reference_curves(adapter, operator, images, target, maps, seeds, steps):
    """One image, one step, one forward pass at a time; probabilities in float64."""
    p = adapter.num_patches
    counts = step_counts(p, steps).tolist()
    out = {c: {"prob": [], "kl": []} for c in CURVES}
    for i in range(images.shape[0]):
        values = maps[i].flatten().tolist()
        order = sorted(range(p), key=lambda j: (-values[j], j))  # most relevant first
        img = images[i:i + 1]
        state = operator.prepare(adapter, img, seeds[i:i + 1])
        clean = adapter.logits(img).double().softmax(-1)[0]
        for curve in CURVES:
            probs, kls = [], []
            for c in counts:
                if curve == "deletion":
                    kept = set(order[c:])
                elif curve == "insertion":
                    kept = set(order[:c])
                else:  # lerf: the c least relevant removed
                    kept = set(order[: p - c])
                keep = torch.tensor([[j in kept for j in range(p)]])
                q = operator(adapter, img, keep, state).double().softmax(-1)[0]
                probs.append(q[target[i]].item())
                kls.append(sum(clean[k] * math.log(clean[k] / q[k]) for k in range(len(q))).item())
            out[curve]["prob"].append(probs)
            out[curve]["kl"].append(kls)
    return torch.tensor(counts, dtype=torch.float64) / p, out


@pytest.mark.parametrize("op_name", ["mean", "noise", "drop", "blur", "zero"])
@torch.no_grad()
def test_harness_matches_slow_reference(tiny, op_name):
    torch.manual_seed(0)
    images = torch.randn(5, 3, 16, 16)
    maps = torch.randint(0, 5, (5, 4, 4)).float()  # ties on purpose
    target = torch.tensor([0, 1, 2, 3, 4])
    seeds = torch.arange(10, 15)
    op = create_operator(op_name)
    for steps in (None, 5):
        ref = prepare_reference(tiny, op, images, seeds, chunk_size=3)
        got = faithfulness_curves(tiny, op, images, target, maps, ref, steps=steps, chunk_size=7)
        x, slow = reference_curves(tiny, op, images, target, maps, seeds, steps)
        assert torch.allclose(got.x.double(), x)
        for curve in CURVES:
            for q in ("prob", "kl"):
                want = torch.tensor(slow[curve][q], dtype=torch.float64)
                have = getattr(got, q)[curve].double()
                assert torch.allclose(have, want, atol=TOL), (curve, q, (have - want).abs().max())
        scores = got.scores()
        for curve in CURVES:
            rows = torch.tensor(slow[curve]["prob"], dtype=torch.float64)
            want = torch.stack([auc(x, row) for row in rows])
            assert torch.allclose(scores[f"{curve}_prob_auc"].double(), want, atol=TOL)
        assert torch.allclose(scores["srg"], scores["lerf_prob_auc"] - scores["deletion_prob_auc"])


@torch.no_grad()
def test_harness_chunking_and_batch_do_not_change_results(tiny):
    torch.manual_seed(1)
    images, maps = torch.randn(6, 3, 16, 16), torch.rand(6, 4, 4)
    target, seeds = torch.arange(6) % 5, torch.arange(6)
    op = create_operator("noise", seed=3)
    ref = prepare_reference(tiny, op, images, seeds)
    a = faithfulness_curves(tiny, op, images, target, maps, ref, steps=8, chunk_size=1)
    b = faithfulness_curves(tiny, op, images, target, maps, ref, steps=8, chunk_size=1000)
    ref2 = prepare_reference(tiny, op, images[3:5], seeds[3:5])
    c = faithfulness_curves(tiny, op, images[3:5], target[3:5], maps[3:5], ref2, steps=8)
    for curve in CURVES:
        assert torch.allclose(a.prob[curve], b.prob[curve], atol=1e-5)
        assert torch.allclose(a.prob[curve][3:5], c.prob[curve], atol=1e-5)
        assert torch.allclose(a.kl[curve][3:5], c.kl[curve], atol=1e-4)


@pytest.mark.parametrize("op_name", ["mean", "drop"])
def test_ground_truth_map_beats_random_on_glyphs(glyphs_model, op_name):
    """The metric must reward the patches the model really uses."""
    from patchbench.datasets import create_dataset
    from patchbench.methods import create_method

    adapter, _ = glyphs_model
    x, _, m = create_dataset("glyphs", "test", size=64).tensors()
    images = adapter.normalize(x)
    with torch.no_grad():
        target = adapter.logits(images).argmax(1)
    truth = adapter.pixel_to_patch(m).float()
    rand = create_method("random", adapter).attribute(images, target)
    op = create_operator(op_name, colour=(0.0, 0.0, 0.0)) if op_name == "mean" else create_operator(op_name)
    ref = prepare_reference(adapter, op, images, torch.arange(64))
    gt = faithfulness_curves(adapter, op, images, target, truth, ref, steps=16).scores()
    rnd = faithfulness_curves(adapter, op, images, target, rand, ref, steps=16).scores()
    assert gt["deletion_prob_auc"].mean() < rnd["deletion_prob_auc"].mean() - 0.2
    assert gt["insertion_prob_auc"].mean() > rnd["insertion_prob_auc"].mean() + 0.1
    assert gt["deletion_kl_auc"].mean() > rnd["deletion_kl_auc"].mean()


def test_pointing_game_and_relevance_mass_against_plain_loops():
    from patchbench.metrics.functional import pointing_game, relevance_mass

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 3, 3, generator=g)
    maps[1] = 0.5  # constant: the first patch is the top one, and there is no mass to share
    maps[2, 0, 1] = maps[2].max() + 1
    maps[2, 2, 2] = maps[2, 0, 1]  # a tie for the top: the lower patch index wins
    truth = torch.rand(6, 3, 3, generator=g) > 0.5
    truth[3] = False  # empty mask: undefined
    truth[2] = False
    truth[2, 0, 1] = True
    hits, mass = pointing_game(maps, truth), relevance_mass(maps, truth)
    for i in range(6):
        m, t = maps[i].flatten().tolist(), truth[i].flatten().tolist()
        if not any(t):
            assert hits[i].isnan() and mass[i].isnan()
            continue
        top = max(range(9), key=lambda j: (m[j], -j))  # highest value, then lowest index
        assert hits[i] == float(t[top])
        shifted = [v - min(m) for v in m]
        if sum(shifted) == 0:
            assert mass[i].isnan()
        else:
            expected = sum(v for v, inside in zip(shifted, t) if inside) / sum(shifted)
            assert mass[i].item() == pytest.approx(expected, abs=1e-6)
    assert hits[2] == 1.0  # the tie went to patch 1, which is the ground truth


def test_ground_truth_as_its_own_map_scores_perfectly():
    from patchbench.metrics.functional import pointing_game, relevance_mass

    truth = torch.zeros(2, 4, 4, dtype=torch.bool)
    truth[0, 1:3, 1:3] = True
    truth[1, 0, :] = True
    assert torch.equal(pointing_game(truth.float(), truth), torch.ones(2))
    assert torch.equal(relevance_mass(truth.float(), truth), torch.ones(2))
    assert torch.equal(relevance_mass((~truth).float(), truth), torch.zeros(2))
