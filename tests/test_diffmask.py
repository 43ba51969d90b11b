"""Vision DiffMask: hard-concrete gates, dual ascent, checkpoints, training behaviour."""

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_vit

from patchbench.methods import create_method
from patchbench.methods.diffmask import (
    CheckpointMismatchError,
    DiffMaskExplainer,
    hard_concrete_sample,
    log_prob_nonzero,
)
from patchbench.methods.diffmask_train import (
    DiffMaskConfig,
    Lookahead,
    Multipliers,
    frozen,
    lagrangian,
    save_explainer,
    train_diffmask,
)
from patchbench.models import ViTAdapter, create_operator


def test_hard_concrete_nonzero_probability_matches_closed_form():
    logits = torch.tensor([-3.0, -1.0, -0.3, 0.0, 0.5, 2.0])
    n = 200_000
    g = torch.Generator().manual_seed(0)
    z = hard_concrete_sample(logits.expand(n, -1), generator=g)
    empirical = (z > 0).double().mean(0)
    closed = log_prob_nonzero(logits).exp().double()
    sigma = (closed * (1 - closed) / n).sqrt()
    assert torch.all((empirical - closed).abs() < 5 * sigma + 1e-4), (empirical, closed)
    # the rectified gate has point masses at exactly 0 and 1, and stays in [0, 1]
    assert (z == 0).any() and (z == 1).any() and z.min() >= 0 and z.max() <= 1


def test_hard_concrete_is_differentiable():
    logits = torch.zeros(1000, requires_grad=True)
    hard_concrete_sample(logits, generator=torch.Generator().manual_seed(1)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_multiplier_ascends_the_constraint():
    lam = Multipliers(3, init=20.0)
    opt = Lookahead(torch.optim.Adam(lam.parameters(), lr=0.3), k=6, alpha=0.5)
    history = []
    for step in range(60):
        violation = 1.0 if step < 20 else -1.0  # KL - eps: violated, then satisfied
        opt.zero_grad()
        (lam[1] * violation).backward()  # the Lagrangian's λ-term; only layer 1 drawn
        lam.ascend(opt, clip=200.0)
        history.append(lam[1].item())
    assert history[19] > 20.0 + 2.0        # grew while violated
    assert history[59] < history[19] - 2.0  # shrank once satisfied
    # plain dual ascent: λ moves by exactly lr·(KL − eps) per step
    lam_sgd = Multipliers(1, init=20.0)
    sgd = torch.optim.SGD(lam_sgd.parameters(), lr=0.5)
    for step in range(60):
        sgd.zero_grad()
        (lam_sgd[0] * (1.0 if step < 20 else -1.0)).backward()
        lam_sgd.ascend(sgd, clip=200.0)
        if step == 19:
            assert lam_sgd[0].item() == pytest.approx(30.0)
    assert lam_sgd[0].item() == pytest.approx(10.0)
    assert lam[0].item() == 20.0 and lam[2].item() == 20.0  # layers not drawn stay put
    # clipped to [0, 200]
    lam2 = Multipliers(1, init=0.1)
    opt2 = torch.optim.SGD(lam2.parameters(), lr=1.0)
    (lam2[0] * -5.0).backward()
    lam2.ascend(opt2, clip=200.0)
    assert lam2[0].item() == 0.0


def test_gradients_reach_gates_and_placeholder_never_the_model():
    adapter = ViTAdapter(tiny_vit())
    explainer = DiffMaskExplainer(32, adapter.depth + 2)
    lambdas = Multipliers(adapter.depth + 2, init=20.0)
    flags = [p.requires_grad for p in adapter.model.parameters()]
    with frozen(adapter.model):
        loss, kl, l0, kept = lagrangian(adapter, explainer, lambdas, torch.randn(4, 3, 16, 16), k=2,
                                  eps=0.1, generator=torch.Generator().manual_seed(0))
        loss.backward()
    assert kept.shape == (4, 16) and (kept.mean(1) > 0.9).all()  # per patch; gates start open (add = 8)
    grads = {n: p.grad for n, p in explainer.named_parameters()}
    assert grads["placeholder"] is not None and grads["placeholder"].abs().sum() > 0
    for i in range(3):  # gates 0..k take part
        assert grads[f"gates.{i}.add"] is not None and grads[f"gates.{i}.add"].abs() > 0
    assert grads["gates.3.add"] is None  # gates above k do not
    assert all(p.grad is None for p in adapter.model.parameters())
    assert [p.requires_grad for p in adapter.model.parameters()] == flags  # restored
    # dL/dλ_k is the constraint KL - eps; other multipliers get no gradient
    assert lambdas[2].grad.item() == pytest.approx((kl - 0.1).mean().item(), rel=1e-5)
    assert lambdas[0].grad is None


def test_frozen_restores_flags_after_exception():
    model = tiny_vit()
    with pytest.raises(RuntimeError), frozen(model):
        assert not any(p.requires_grad for p in model.parameters())
        raise RuntimeError
    assert all(p.requires_grad for p in model.parameters())


IMAGES = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    adapter = ViTAdapter(tiny_vit(), key="tiny-test-model")
    cfg = DiffMaskConfig(steps=20, batch_size=8, seed=3)
    explainer, log = train_diffmask(adapter, IMAGES, cfg, progress=False)
    path = tmp_path_factory.mktemp("dm") / "dm.pt"
    save_explainer(path, explainer, adapter, "random", cfg, {})
    return adapter, path, cfg, log, explainer


def test_checkpoint_round_trip_gives_identical_masks(trained):
    adapter, path, _, _, _ = trained
    images = torch.randn(5, 3, 16, 16)
    a = create_method("diffmask", adapter, checkpoint=path).attribute(images, torch.zeros(5).long())
    b = create_method("diffmask", adapter, checkpoint=path).attribute(images, torch.zeros(5).long())
    assert torch.equal(a, b) and a.shape == (5, 4, 4) and (a <= 0).all()  # log-probabilities


def test_checkpoint_for_another_model_is_refused(trained):
    _, path, _, _, _ = trained
    other = ViTAdapter(tiny_vit(), key="some-other-model")
    with pytest.raises(CheckpointMismatchError, match="explains model 'tiny-test-model'"):
        create_method("diffmask", other, checkpoint=path)
    wider = ViTAdapter(tiny_vit(embed_dim=64), key="")
    with pytest.raises(CheckpointMismatchError, match="width 32; the model needs 4 of width 64"):
        create_method("diffmask", wider, checkpoint=path)
    with pytest.raises(FileNotFoundError):
        create_method("diffmask", other, checkpoint=path.parent / "missing.pt")
    with pytest.raises(ValueError, match="needs a trained explainer"):
        create_method("diffmask", other)


def test_training_is_deterministic(trained):
    adapter, _, cfg, log, explainer = trained
    torch.manual_seed(123)  # training must not depend on the global RNG state
    explainer2, log2 = train_diffmask(adapter, IMAGES, cfg, progress=False)
    assert log == log2
    for (name, a), b in zip(explainer.state_dict().items(), explainer2.state_dict().values()):
        assert torch.equal(a, b), name
    other, _ = train_diffmask(adapter, IMAGES, DiffMaskConfig(steps=20, batch_size=8, seed=4),
                              progress=False)
    assert not torch.equal(other.placeholder, explainer.placeholder)


def test_training_log_has_kl_l0_and_every_multiplier(trained):
    adapter, _, cfg, log, _ = trained
    assert len(log) == cfg.steps
    assert set(log[0]) == {"step", "layer", "kl", "l0", "kept", "saturated", "gate_add_mean",
                           "gate_add_max", *(f"lambda_{i}" for i in range(adapter.depth + 2)),
                           "check_kl", "check_kept", "selected"}
    # 20 steps < check_every: nothing to choose between, so no checks, and the last is returned
    assert not [r["step"] for r in log if r["check_kl"] == r["check_kl"]]
    assert [r["step"] for r in log if r["selected"]] == [cfg.steps - 1]


def test_placeholder_operator_uses_the_learned_vector(trained):
    adapter, path, _, _, _ = trained
    op = create_operator("placeholder", checkpoint=str(path))
    images = torch.randn(2, 3, 16, 16)
    keep = torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(op(adapter, images, keep, None), adapter.logits(images), atol=1e-5)
        keep[:, :8] = False
        h0 = adapter.patch_embeddings(images)
        h0[:, :8] = op.vector
        assert torch.allclose(op(adapter, images, keep, None), adapter.forward_embeddings(h0), atol=1e-5)
    with pytest.raises(ValueError, match="exactly one of"):
        create_operator("placeholder")


@pytest.mark.parametrize("form", ["count", "log"])
def test_l0_term_is_the_expected_kept_count_or_the_references_log_form(form):
    adapter = ViTAdapter(tiny_vit())
    explainer = DiffMaskExplainer(32, adapter.depth + 2, add=1.0)  # gates half open: P far from 0 and 1
    lambdas = Multipliers(adapter.depth + 2, init=20.0)
    images = torch.randn(3, 3, 16, 16)
    with frozen(adapter.model), torch.no_grad():
        _, kl, l0, kept = lagrangian(adapter, explainer, lambdas, images, k=2, eps=0.1,
                                     generator=torch.Generator().manual_seed(0), l0_form=form)
        _, states = adapter.forward_embeddings(adapter.patch_embeddings(images), hidden=True)
        p = log_prob_nonzero(explainer.gate_logits(states, adapter.num_prefix_tokens, upto=2)).exp()
    # slow and plain: per image, per patch, the product over gates 0..k of P(z_i != 0)
    expected = [sum(math.prod(p[b, j, i].item() for i in range(3)) for j in range(16)) if form == "count"
                else sum(sum(math.log(p[b, j, i].item()) for i in range(3)) for j in range(16)) / 16
                for b in range(3)]
    assert l0.tolist() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="l0 must be 'count' or 'log', got 'sum'"):
        lagrangian(adapter, explainer, lambdas, images, k=2, eps=0.1, l0_form="sum")


def test_training_lowers_l0_and_keeps_kl_near_eps():
    """End to end on a tiny model: the mask shrinks while the KL stays close to eps."""
    torch.manual_seed(0)
    adapter = ViTAdapter(tiny_vit(depth=1))
    # make the model depend on only a few patches, so a small mask can keep the output
    with torch.no_grad():
        adapter.model.head.weight.mul_(20)
    images = torch.randn(256, 3, 16, 16)
    cfg = DiffMaskConfig(steps=300, batch_size=16, lr=1e-2, seed=0)
    _, log = train_diffmask(adapter, images, cfg, progress=False)
    first = sum(r["kept"] for r in log[:20]) / 20
    last = log[-60:]
    kept = sum(r["kept"] for r in last) / len(last)
    kl = sum(r["kl"] for r in last) / len(last)
    assert first > 0.9 and kept < first - 0.2, (first, kept)
    assert kl < 3 * cfg.eps, kl
    assert math.isfinite(kl)


def test_training_returns_the_checked_explainer_that_best_meets_the_objective():
    """Checks every few steps; the explainer returned is the feasible one (KL <= eps) with
    the fewest kept patches, its weights restored, not the last step's."""
    from patchbench.methods.diffmask_train import _better, check_explainer, check_indices

    torch.manual_seed(0)
    adapter = ViTAdapter(tiny_vit(depth=1))
    with torch.no_grad():
        adapter.model.head.weight.mul_(20)
    images = torch.randn(96, 3, 16, 16)
    cfg = DiffMaskConfig(steps=60, batch_size=16, lr=1e-2, seed=0, check_every=12, check_images=48, eps=0.03)
    explainer, log = train_diffmask(adapter, images, cfg, progress=False)
    checks = [(r["step"], r["check_kl"], r["check_kept"]) for r in log if r["check_kl"] == r["check_kl"]]
    assert [s for s, _, _ in checks] == [11, 23, 35, 47, 59]
    feasible = [c for c in checks if c[1] <= cfg.eps]
    want = min(feasible, key=lambda c: c[2]) if feasible else min(checks, key=lambda c: c[1])
    assert [r["step"] for r in log if r["selected"]] == [want[0]] and want[0] != 59  # not the last
    # the returned weights are that step's: checking them again gives its numbers
    index = check_indices(96, cfg)
    assert check_explainer(adapter, explainer, images[index], index, cfg) == pytest.approx(want[1:], rel=1e-5)
    # the rule itself: feasible beats infeasible, then fewer kept, or (infeasible) lower KL
    assert _better((0.09, 0.9), (0.2, 0.1), 0.1) and not _better((0.2, 0.1), (0.09, 0.9), 0.1)
    assert _better((0.05, 0.3), (0.01, 0.4), 0.1) and _better((0.3, 0.9), (0.4, 0.1), 0.1)
    # checks do not disturb training: without them, the same run returns the last step's weights
    last, _ = train_diffmask(adapter, images, dataclasses.replace(cfg, check_every=0), progress=False)
    again = check_explainer(adapter, last, images[index], index, cfg)
    assert again == pytest.approx(checks[-1][1:], rel=1e-5)


def test_train_diffmask_for_an_operator_from_the_command_line(tmp_path, capsys):
    from patchbench.cli import main

    for operator in ("drop", "mean"):
        code = main(["train-diffmask", "--dataset", "toy-count", "--steps", "3", "--operator", operator,
                     "--results-dir", str(tmp_path), "--quiet"])
        assert code == 0
        meta = json.loads(capsys.readouterr().out)
        assert meta["removal"]["name"] == operator and meta["config"]["steps"] == 3
        log = pd.read_csv(meta["log"])
        assert meta["log"].endswith(f"diffmask_train_toy-count_{operator}.csv") and len(log) == 3
    assert len(meta["removal"]["colour"]) == 3  # the mean colour, as a run gives the operator


def test_explainer_cache_key_holds_code_config_removal_and_weights(tmp_path, monkeypatch):
    from patchbench.methods import diffmask_train as dt

    cfg = DiffMaskConfig()
    base = dt.checkpoint_path("m", "glyphs", cfg, None, None, "w1")
    assert dt.checkpoint_path("m", "glyphs", cfg, None, None, "w1") == base  # stable
    assert dt.checkpoint_path("m", "glyphs", cfg, None, None, "w2") != base  # weights
    assert dt.checkpoint_path("m", "glyphs", DiffMaskConfig(steps=10), None, None, "w1") != base  # config
    assert dt.checkpoint_path("m", "glyphs", cfg, None, {"name": "drop"}, "w1") != base  # removal
    edited = tmp_path / "diffmask_train.py"  # the training code, edited
    edited.write_text(Path(dt.__file__).read_text() + "\n# changed\n")
    (tmp_path / "diffmask.py").write_text(Path(dt.__file__).with_name("diffmask.py").read_text())
    monkeypatch.setattr(dt, "__file__", str(edited))
    assert dt.checkpoint_path("m", "glyphs", cfg, None, None, "w1") != base


def test_training_against_soft_drop_lowers_the_mask_and_keeps_the_output(tiny):
    torch.manual_seed(0)
    images = torch.randn(64, 3, 16, 16)
    cfg = DiffMaskConfig(steps=200, batch_size=16, eps=0.1)
    drop, calls = create_operator("drop"), []
    soft = drop.soft
    # the relaxation is what removes, in every training step (with a gradient) and every check
    drop.soft = lambda *args: calls.append(torch.is_grad_enabled()) or soft(*args)
    explainer, log = train_diffmask(tiny, images, cfg, progress=False, removal=drop)
    assert sum(calls) == cfg.steps and len(calls) > cfg.steps
    first, last = log[:10], log[-20:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(first, "kept") > 0.8 and mean(last, "kept") < 0.5 * mean(first, "kept")
    assert mean(last, "kl") < 2 * cfg.eps  # the constraint holds, roughly, while L0 falls


def test_the_sanity_check_retrains_for_each_model_it_explains(glyphs_model):
    from patchbench.bench import BenchConfig
    from patchbench.bench.sanity import randomised_copy
    from patchbench.context import RunContext
    from patchbench.methods.diffmask import DiffMask, diffmask_meta
    from patchbench.utils import weights_digest

    adapter = glyphs_model[0]
    cfg = BenchConfig(sanity_train_steps=3, diffmask_config={"batch_size": 4})
    drop = create_operator("drop")
    run = RunContext(cfg, "glyphs", adapter, progress=False).for_operator("drop", drop, 0)
    given = {"checkpoint": "trained-for-the-original-model.pt"}
    paths = []
    for model in (adapter, randomised_copy(adapter, 1), randomised_copy(adapter, 2)):
        options = DiffMask.options_for_model(run, dict(given), model)
        meta = diffmask_meta(options["checkpoint"])
        # trained now for this very model (its weights), against the same removal, briefly
        assert meta["weights_digest"] == weights_digest(model.model)
        assert meta["removal"]["name"] == "drop" and meta["config"]["steps"] == 3
        paths.append(options["checkpoint"])
    assert len(set(paths)) == 3 and given["checkpoint"] not in paths
