"""Run configs: every file shipped in patchbench/configs/ parses and validates, the default
file is the embedded default, the paper configs encode the paper's task, errors name the
problem, the command line overrides the file, the noise operator in normalised space, and a
shortened paper run."""

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import tiny_vit
from test_files import write_cifar

from patchbench import cli
from patchbench.bench import runner
from patchbench.bench.config import BenchConfig, read_config
from patchbench.metrics.functional import step_counts
from patchbench.models import ViTAdapter, create_operator
from patchbench.models.removal import NoiseOperator
from patchbench.registry import UnknownNameError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "src" / "patchbench" / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.toml"))
EXPECTED = {"default", "paper-cifar10", "paper-imagenet", "ours", "ci", "chefer-imagenet",
            "attnlrp-imagenet", "operators"}
PAPER_MODELS = {"paper-cifar10": "hf:tanlq/vit-base-patch16-224-in21k-finetuned-cifar10",
                "paper-imagenet": "hf:google/vit-base-patch16-224"}
PROTOCOLS = ("chefer-imagenet", "attnlrp-imagenet")
HALF = (0.5, 0.5, 0.5)


@pytest.fixture
def in_repo(monkeypatch, tmp_path):
    """Names resolve inside the installed package: run from a folder that has no configs/."""
    monkeypatch.chdir(tmp_path)


def write_toml(tmp_path, text: str, name: str = "run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- 1. every file parses and validates ---------------------------------------------------------

def test_the_config_files_are_exactly_the_documented_ones():
    assert {p.stem for p in CONFIG_FILES} == EXPECTED


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_file_parses_and_validates(path):
    values = read_config(path)
    assert values["run"] == path.stem  # results go to results/<file name>
    cfg = BenchConfig(**values)
    cfg.validate()
    for key, value in values.items():
        assert not isinstance(value, list), key  # lists become tuples, like the defaults


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_resolves_by_name_from_any_folder(name, in_repo):
    assert read_config(name) == read_config(CONFIG_DIR / f"{name}.toml")


# ---- 2. default.toml is the embedded default ---------------------------------------------------

def test_default_file_equals_the_embedded_default():
    values = read_config(CONFIG_DIR / "default.toml")
    assert {"run", "model", "datasets", "methods", "operators", "n_images", "steps", "seed"} <= set(values)
    default = BenchConfig()
    for key, value in values.items():
        expected = getattr(default, key)
        if isinstance(expected, tuple | list):
            assert tuple(value) == tuple(expected), key
        else:
            assert value == expected, key
    assert BenchConfig(**values) == default


# ---- 3. the paper configs encode the paper's task ----------------------------------------------

@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_config_encodes_the_papers_task(name):
    values = read_config(CONFIG_DIR / f"{name}.toml")
    cfg = BenchConfig(**values)
    assert cfg.model == PAPER_MODELS[name] and cfg.model.startswith("hf:")
    assert cfg.operators == ("noise",)
    noise = cfg.operator_options["noise"]
    assert noise["space"] == "normalised" and noise["low"] == -1 and noise["high"] == 1
    assert set(cfg.operator_options) == {"noise"}
    assert cfg.steps == 28 and cfg.n_images == 50 and cfg.target == "prediction"
    counts = step_counts(196, cfg.steps)  # ViT-B/16 at 224: 14 x 14 patches
    assert counts.tolist() == list(range(0, 197, 7)) and len(counts) == 29
    assert "random" in cfg.methods and "diffmask" in cfg.methods
    # the options are ones the noise operator takes, and give U(-1, 1) in model-input space
    op = create_operator("noise", seed=cfg.seed, **noise)
    assert op.config() == {"name": "noise", "seed": cfg.seed, "space": "normalised", "low": -1.0,
                           "high": 1.0}


# ---- 4. read_config and validate() errors -------------------------------------------------------

def test_unknown_key_is_refused_naming_the_close_one(tmp_path):
    path = write_toml(tmp_path, 'run = "x"\nn_image = 5\n')
    with pytest.raises(ValueError, match="n_image") as e:
        read_config(path)
    assert "did you mean 'n_images'" in str(e.value)


def test_invalid_toml_is_a_value_error(tmp_path):
    path = write_toml(tmp_path, "n_images = = 5\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        read_config(path)


def test_unknown_config_name_lists_the_available_ones(in_repo):
    with pytest.raises(FileNotFoundError) as e:
        read_config("paper-cifar100")
    message = str(e.value)
    assert "paper-cifar100" in message
    assert "default, operators, ours, paper-cifar10, paper-imagenet" in message


def test_unknown_operator_in_operator_options_fails_validation(tmp_path):
    path = write_toml(tmp_path, 'operators = ["noise"]\n[operator_options.nosie]\nspace = "normalised"\n')
    cfg = BenchConfig(**read_config(path))
    with pytest.raises((UnknownNameError, ValueError), match="nosie"):
        cfg.validate()


def test_operator_options_must_be_tables(tmp_path):
    path = write_toml(tmp_path, 'operators = ["noise"]\noperator_options = { noise = 3 }\n')
    with pytest.raises(ValueError, match="operator_options.noise"):
        BenchConfig(**read_config(path)).validate()


def test_unknown_diffmask_config_key_fails_validation(tmp_path):
    path = write_toml(tmp_path, "[diffmask_config]\nstep = 3\n")
    cfg = BenchConfig(**read_config(path))
    with pytest.raises(ValueError, match="step"):
        cfg.validate()


# ---- 5. the command line overrides the file ----------------------------------------------------

@pytest.fixture
def recorded(monkeypatch):
    """run_benchmark replaced by a stub recording the config the command line builds."""
    seen = []

    def stub(cfg, progress=True):
        seen.append((cfg, progress))
        return {"markdown": "", "run_dir": "nowhere", "failures": []}

    monkeypatch.setattr(runner, "run_benchmark", stub)
    return seen


def test_parser_leaves_options_not_given_unset(tmp_path):
    args = cli._parser().parse_args(["bench", "--config", "x.toml", "--n-images", "5"])
    assert {k for k in vars(args) if k in {f.name for f in dataclasses.fields(BenchConfig)}} == {"n_images"}
    assert args.n_images == 5


def test_command_line_overrides_the_file_which_overrides_the_defaults(tmp_path, recorded):
    path = write_toml(tmp_path, 'run = "x"\nn_images = 7\nsteps = 3\n')
    assert cli.main(["bench", "--config", str(path), "--n-images", "5", "--quiet"]) == 0
    [(cfg, progress)] = recorded
    assert cfg.n_images == 5  # command line
    assert cfg.steps == 3 and cfg.run == "x"  # file
    assert cfg.seed == 0 and cfg.model == BenchConfig().model  # defaults
    assert cfg.methods == BenchConfig().methods and progress is False


def test_command_line_on_a_named_paper_config(in_repo, recorded):
    assert cli.main(["bench", "--config", "paper-cifar10", "--steps", "4", "--methods", "rand*",
                     "--quiet"]) == 0
    [(cfg, _)] = recorded
    assert cfg.steps == 4 and cfg.methods == ("random",)
    assert cfg.operators == ("noise",) and cfg.operator_options["noise"]["space"] == "normalised"
    assert cfg.n_images == 50 and cfg.run == "paper-cifar10"


def test_command_line_reports_a_bad_config_file(tmp_path, recorded, capsys):
    path = write_toml(tmp_path, "n_image = 5\n")
    assert cli.main(["bench", "--config", str(path), "--quiet"]) == 2
    assert "n_images" in capsys.readouterr().err and recorded == []


# ---- 6. the noise operator in normalised space -------------------------------------------------

@pytest.fixture(scope="module")
def half_vit():
    """A tiny random ViT (16x16 images, grid 4x4) normalised with mean = std = 0.5."""
    return ViTAdapter(tiny_vit(), mean=HALF, std=HALF)


def clean_images(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.rand(n, 3, 16, 16, generator=g) - 0.5) / 0.5


def test_normalised_noise_is_per_pixel_uniform_in_model_input_space(half_vit):
    x = clean_images()
    op = NoiseOperator(seed=0, space="normalised", low=-1.0, high=1.0)
    base = op.baseline(half_vit, x, torch.tensor([10, 11, 12, 13]))
    assert base.shape == x.shape and base.dtype == x.dtype
    assert base.min() >= -1 and base.max() <= 1
    assert base.min() < -0.9 and base.max() > 0.9  # spans the range, not [0, 1] normalised twice
    for img in base:
        assert img.unique().numel() > 0.9 * img.numel()  # per pixel and channel
    narrow = NoiseOperator(seed=0, space="normalised", low=-0.25, high=0.5).baseline(
        half_vit, x[:1], torch.tensor([10]))
    assert narrow.min() >= -0.25 and narrow.max() <= 0.5


def test_normalised_noise_depends_on_the_image_seed_only(half_vit):
    x = clean_images()
    op = NoiseOperator(seed=0, space="normalised", low=-1.0, high=1.0)
    batch = op.baseline(half_vit, x, torch.tensor([10, 11, 12, 13]))
    alone = op.baseline(half_vit, x[2:3], torch.tensor([12]))
    other_batch = op.baseline(half_vit, x[[3, 0]], torch.tensor([5, 12]))
    torch.testing.assert_close(alone[0], batch[2], rtol=0, atol=0)
    torch.testing.assert_close(other_batch[1], batch[2], rtol=0, atol=0)
    assert not torch.allclose(batch[0], batch[1])  # other seed, other noise
    reseeded = NoiseOperator(seed=1, space="normalised").baseline(half_vit, x[2:3], torch.tensor([12]))
    assert not torch.allclose(reseeded[0], batch[2])  # the run seed is mixed in


def test_normalised_noise_equals_pixel_noise_when_mean_and_std_are_a_half(half_vit):
    x = clean_images()
    seeds = torch.tensor([3, 1, 4, 1])
    normalised = NoiseOperator(seed=7, space="normalised", low=-1.0, high=1.0).baseline(half_vit, x, seeds)
    pixel = NoiseOperator(seed=7, space="pixel").baseline(half_vit, x, seeds)
    torch.testing.assert_close(normalised, pixel, rtol=0, atol=1e-6)


def test_noise_config_records_space_and_range_and_refuses_bad_values():
    assert NoiseOperator(seed=3, space="normalised", low=-1, high=1).config() == {
        "name": "noise", "seed": 3, "space": "normalised", "low": -1.0, "high": 1.0}
    assert NoiseOperator().config() == {"name": "noise", "seed": 0, "space": "pixel", "low": 0.0,
                                        "high": 1.0}
    assert NoiseOperator(space="normalised").low == -1.0  # the default range follows the space
    with pytest.raises(ValueError, match="low < high"):
        NoiseOperator(space="normalised", low=1.0, high=1.0)
    with pytest.raises(ValueError, match="low < high"):
        NoiseOperator(space="normalised", low=0.5, high=-0.5)
    with pytest.raises(ValueError, match="low < high"):
        NoiseOperator(low=2.0)  # pixel space, high defaults to 1
    with pytest.raises(ValueError, match="space"):
        NoiseOperator(space="normalized")


# ---- 7. a shortened paper config end to end ----------------------------------------------------

def save_tiny_hf_vit(folder: Path, num_labels: int, width: int, heads: int) -> None:
    """A seeded random ViTForImageClassification (32 px, 8-px patches, 2 layers), saved."""
    transformers = pytest.importorskip("transformers")
    vit_cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=width, num_hidden_layers=2,
                                     num_attention_heads=heads, intermediate_size=2 * width,
                                     num_labels=num_labels)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(vit_cfg).eval().save_pretrained(folder)


def test_shortened_paper_cifar10_config_runs_end_to_end(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    save_tiny_hf_vit(tmp_path / "vit", num_labels=10, width=64, heads=4)
    write_cifar(tmp_path / "data", n_per_batch=12)
    values = read_config(CONFIG_DIR / "paper-cifar10.toml")
    values.update(model=f"hf:{tmp_path / 'vit'}", data_root=str(tmp_path / "data"), n_images=6, steps=4,
                  results_dir=str(tmp_path / "results"), methods=("random", "rollout", "diffmask"),
                  diffmask_config={**values["diffmask_config"], "steps": 3, "batch_size": 4})
    cfg = BenchConfig(**values)
    runner.run_benchmark(cfg, progress=False)
    run_dir = tmp_path / "results" / "paper-cifar10"
    scores = pd.read_csv(run_dir / "scores.csv")
    assert set(scores.operator) - {"-"} == {"noise"}  # "-" marks operator-free rows (AUROC)
    assert set(scores.method) == {"random", "rollout", "diffmask"}
    assert scores.sample_id.nunique() == 6 and set(scores.dataset) == {"cifar10"}
    assert scores[scores.operator == "noise"].value.notna().all()
    run = json.loads((run_dir / "run.json").read_text())
    noise = run["models"]["cifar10"]["operators"]["noise"]
    assert noise == {"name": "noise", "seed": 0, "space": "normalised", "low": -1.0, "high": 1.0}
    assert run["config"]["operator_options"] == {"noise": {"space": "normalised", "low": -1.0,
                                                           "high": 1.0}}
    assert run["config"]["diffmask_config"]["steps"] == 3
    assert str(tmp_path / "cache") in run["models"]["cifar10"]["diffmask"]["noise"]["checkpoint"]
    curves = pd.read_csv(run_dir / "curves.csv.gz")
    assert set(curves.operator) == {"noise"}
    points = curves.groupby(["method", "curve", "quantity", "sample_id"]).size()
    assert len(points) == 3 * 3 * 4 * 6 and points.eq(5).all()  # 4 quantities, steps 4: five points
    assert sorted(curves.x.unique().tolist()) == [0, 0.25, 0.5, 0.75, 1]


# ---- one declaration: the command line is derived from BenchConfig's fields --------------------

def test_every_setting_is_one_option_and_every_option_a_setting():
    parser = cli._parser()
    bench = next(a for a in parser._actions if a.dest == "command").choices["bench"]
    options = {a.dest: a for a in bench._actions}
    settings = {f.name: f for f in dataclasses.fields(BenchConfig)}
    assert set(options) - {"help", "config", "quiet"} == {n for n, f in settings.items() if f.metadata["cli"]}
    assert all(f.metadata["help"] for f in settings.values())
    assert options["target"].choices == ["prediction", "label"]
    assert options["run"].option_strings == ["--run", "--run-name"]
    args = parser.parse_args(["bench", "--methods", "a,b", "--steps", "3", "--pretrained",
                              "--plugin", "x.py", "--plugin", "y.py", "--limit", "9"])
    assert (args.methods, args.steps, args.pretrained, args.plugins, args.n_images) == (
        ("a", "b"), 3, True, ["x.py", "y.py"], 9)
    with pytest.raises(ValueError, match="overwrite must be one of never, missing, always, got 'x'"):
        BenchConfig(overwrite="x").validate()


# ---- the literature's protocols -----------------------------------------------------------------

def test_protocol_configs_encode_the_published_setups():
    chefer = BenchConfig(**read_config(CONFIG_DIR / "chefer-imagenet.toml"))
    assert chefer.operators == ("zero",) and chefer.steps == 10 and chefer.target == "label"
    assert chefer.scores == ("chefer_negative", "chefer_positive")
    x = step_counts(196, chefer.steps).float() / 196  # ViT-B/16 at 224: 196 patches
    assert (x - torch.arange(11) / 10).abs().max() <= 0.5 / 196  # 0, 10, ..., 100% to a patch
    attnlrp = BenchConfig(**read_config(CONFIG_DIR / "attnlrp-imagenet.toml"))
    assert attnlrp.operators == ("zero_embedding",) and attnlrp.scores[0] == "srg_logit"
    assert {"attnlrp", "lrp"} <= set(attnlrp.methods) and "attnlrp" in chefer.methods


def test_protocol_scores_against_a_hand_calculation():
    from patchbench.metrics.faithfulness import Curves
    from patchbench.metrics.functional import auc
    from patchbench.metrics.scores import faithfulness_scores

    x = torch.arange(11) / 10
    hits = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0], [1.0] * 11])  # two images
    kept = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [1.0] * 11])
    logit_del = torch.tensor([[6.0, 4, 2, 1, 0, 0, 0, 0, 0, 0, -1]] * 2)
    logit_lerf = torch.tensor([[6.0, 6, 6, 6, 5, 5, 4, 3, 2, 1, -1]] * 2)
    other = {"deletion": hits, "lerf": kept}  # p and KL play no part here
    curves = Curves(x, prob=other, kl=other, logit={"deletion": logit_del, "lerf": logit_lerf},
                    correct={"deletion": hits, "lerf": kept})
    got = faithfulness_scores(curves)
    # trapezoids of 0.1 from 0 to 0.9: (1 + 1 + .5 + .5 + .5) * .1 = .35 -> 35; all hits: 90
    assert got["chefer_positive"].tolist() == pytest.approx([35.0, 90.0])
    # (8 ones, then (1 + 0) / 2) * .1 = .85 -> 85
    assert got["chefer_negative"].tolist() == pytest.approx([85.0, 90.0])
    # the AUC of the mean accuracy curve equals the mean of the per-image AUCs (published way)
    assert 100 * auc(x, hits.mean(0), upto=0.9).item() == pytest.approx(got["chefer_positive"].mean().item())
    # area between LeRF and MoRF logit curves over [0, 1]: sums of the trapezoids by hand
    lerf = (6 + 6 + 6 + 5.5 + 5 + 4.5 + 3.5 + 2.5 + 1.5 + 0) * 0.1
    morf = (5 + 3 + 1.5 + 0.5 + 0 + 0 + 0 + 0 + 0 - 0.5) * 0.1
    assert got["srg_logit"].tolist() == pytest.approx([lerf - morf] * 2)
    # a grid that misses 0.9 is interpolated there
    grid = torch.tensor([0, 0.5, 1.0])
    assert auc(grid, torch.tensor([1.0, 0.0, 0.0]), upto=0.9).item() == pytest.approx(0.25)
    assert auc(grid, torch.tensor([1.0, 1.0, 0.0]), upto=0.9).item() == pytest.approx(0.5 + 0.4 * 1.2 / 2)


@pytest.mark.parametrize("name", PROTOCOLS)
def test_protocol_config_runs_end_to_end(name, tmp_path, monkeypatch, one_thread):
    from test_files import write_folder

    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path / "cache"))
    save_tiny_hf_vit(tmp_path / "vit", num_labels=3, width=32, heads=2)
    write_folder(tmp_path / "val", per_class=3, size=(32, 32))
    values = read_config(CONFIG_DIR / f"{name}.toml")
    values.update(model=f"hf:{tmp_path / 'vit'}", data_root=str(tmp_path / "val"), n_images=6,
                  results_dir=str(tmp_path / "results"), methods=("random", "attnlrp"), batch_size=3)
    out = runner.run_benchmark(BenchConfig(**values), progress=False)
    assert out["failures"] == []
    scores = out["scores"]
    shown = values["scores"]
    assert set(shown) <= set(scores.metric) and scores[scores.metric.isin(shown)].value.notna().all()
    board = (tmp_path / "results" / name / "leaderboard.md").read_text()
    header = next(line for line in board.splitlines() if line.startswith("| method"))
    from patchbench.metrics.scores import score

    # the protocol's scores, in its order, each with its unit; nothing else
    columns = [c.strip() for c in header.strip("|").split("|")][1:1 + len(shown)]
    assert [c.split(" ")[0] for c in columns] == [score(s).label.split(" ")[0] for s in shown]
    assert all(f"[{score(s).unit}]" in c for s, c in zip(shown, columns))
    if name == "chefer-imagenet":
        values = scores[scores.metric == "chefer_negative"].value
        assert values.between(0, 90).all()
