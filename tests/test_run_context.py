"""Components prepare themselves: what a method or operator needs from the run (a seed, the
dataset's mean colour, a trained artifact) it asks for through ``options_from_run``, and the
runner never tests a component's name."""

import ast
from pathlib import Path

import torch

from patchbench.bench import BenchConfig, run_benchmark
from patchbench.bench.runner import Given
from patchbench.context import RunContext, options_from_run
from patchbench.datasets import DATASETS
from patchbench.methods import METHODS
from patchbench.methods.base import Method
from patchbench.models import OPERATORS
from patchbench.models.removal import PixelOperator

BENCH = Path(__file__).resolve().parents[1] / "src" / "patchbench" / "bench"
TINY = dict(datasets=("glyphs",), n_images=4, steps=2, sanity_images=0, gallery_size=0)


def _component_names_in(path: Path) -> list[str]:
    """String constants naming a registered component, compared with or passed to a call."""
    names = set(METHODS.list()) | set(OPERATORS.list()) | set(DATASETS.list())
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            values = [node.left, *node.comparators]
        elif isinstance(node, ast.Call):
            values = [*node.args, *(k.value for k in node.keywords)]
        else:
            continue
        found += [f"{path.name}:{node.lineno} {c.value!r}" for c in values
                  if isinstance(c, ast.Constant) and c.value in names]
    return found


def test_no_component_name_decides_anything_in_bench():
    found = [f for path in sorted(BENCH.glob("*.py")) if path.name != "config.py"  # config: defaults
             for f in _component_names_in(path)]
    # results.py: the summary's column of means (a statistic, not the operator); speed.py: the
    # same-work table needs a constant baseline that Quantus can apply too
    assert [f.split(":")[0] + " " + f.split(" ")[1] for f in found] == [
        "results.py 'mean'", "speed.py 'mean'"], found


class Chance(Method):
    """A plugin chance control under another name than ``random``."""

    name = "chance-test"
    chance_control = True

    def _attribute(self, images, target):
        return torch.rand(images.shape[0], *self.adapter.grid, generator=torch.Generator().manual_seed(0))


def test_the_chance_control_is_found_by_its_role_not_its_name(tmp_path, glyphs_model, one_thread):
    METHODS.register(Chance.name)(Chance)
    try:
        cfg = BenchConfig(run="chance", results_dir=str(tmp_path), methods=("rollout", Chance.name),
                          operators=("mean",), **TINY)
        out = run_benchmark(cfg, progress=False)
    finally:
        METHODS.unregister(Chance.name)
    faithful = out["summary"][out["summary"].operator == "mean"].set_index(["method", "metric"])
    # the control is the zero (NaN where it ties the best: nothing to normalise by)
    normalised = faithful.loc[Chance.name, "normalised"]
    assert normalised["srg"] == 0 and (normalised.dropna() == 0).all()
    assert set(out["metric_check"].metric) >= {"srg"}  # the mask was compared with it


def test_built_in_hooks(tiny):
    run = RunContext(BenchConfig(seed=7), "glyphs", tiny)
    assert options_from_run(METHODS.get("random"), run, {}) == {"seed": 7}
    assert options_from_run(METHODS.get("random"), run, {"seed": 3}) == {"seed": 3}  # the user's wins
    assert options_from_run(OPERATORS.get("noise"), run, {"space": "normalised"}) == {
        "seed": 7, "space": "normalised"}
    assert options_from_run(METHODS.get("rollout"), run, {"discard_ratio": 0.5}) == {"discard_ratio": 0.5}
    assert options_from_run(OPERATORS.get("mean"), run, {"colour": (1, 2, 3)}) == {"colour": (1, 2, 3)}
    assert "mean_colour" not in run.meta  # not computed when the user gave a colour
    assert run.memo("shared", lambda: [1]) is run.memo("shared", lambda: [2])


def test_mean_hook_uses_the_datasets_colour(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHBENCH_CACHE", str(tmp_path))
    run = RunContext(BenchConfig(dataset_options={"toy-count": {"size": 30}}), "toy-count", tiny)
    options = options_from_run(OPERATORS.get("mean"), run, {})
    pixels = run.meta["mean_colour"]["rgb"]
    assert options == {"colour": tuple(run.meta["mean_colour"]["model_input"])}
    torch.testing.assert_close(torch.tensor(options["colour"]),
                               (torch.tensor(pixels) - torch.tensor(tiny.mean)) / torch.tensor(tiny.std))


class SeededShift(PixelOperator):
    """A plugin operator that needs the run's seed and dataset."""

    name = "seeded-shift-test"
    seen: list = []

    @classmethod
    def options_from_run(cls, run, options):
        cls.seen.append((run.dataset, run.seed, run.adapter.grid))
        return {"shift": float(run.seed) / 10, **options}

    def __init__(self, shift: float = 0.0, scale: float = 1.0) -> None:
        self.shift, self.scale = shift, scale

    def baseline(self, adapter, images, seeds):
        return torch.full_like(images, self.shift * self.scale)

    def config(self):
        return {"name": self.name, "shift": self.shift, "scale": self.scale}


class NeedsSeed(Method):
    name = "needs-seed-test"
    seen: list = []

    @classmethod
    def options_from_run(cls, run, options):
        cls.seen.append(run.dataset)
        return {"offset": run.seed, **options}

    def __init__(self, adapter, offset: int = -1) -> None:
        super().__init__(adapter)
        self.offset = offset

    def _attribute(self, images, target):
        assert self.offset == 3
        g = torch.Generator().manual_seed(self.offset)
        return torch.rand(images.shape[0], *self.adapter.grid, generator=g)


def test_plugin_components_prepare_themselves_in_a_run(tmp_path, glyphs_model, one_thread):
    OPERATORS.register(SeededShift.name)(SeededShift)
    METHODS.register(NeedsSeed.name)(NeedsSeed)
    try:
        cfg = BenchConfig(run="ctx", results_dir=str(tmp_path), seed=3, methods=(NeedsSeed.name,),
                          operators=(SeededShift.name,), operator_options={SeededShift.name: {"scale": 2.0}},
                          **TINY)
        # the seed-0 model given as an object: by name, seed 3 would train a model of its own
        out = run_benchmark(cfg, progress=False, given=Given(model=glyphs_model))
    finally:
        OPERATORS.unregister(SeededShift.name)
        METHODS.unregister(NeedsSeed.name)
    assert out["failures"] == []
    assert SeededShift.seen[-1][:2] == ("glyphs", 3) and NeedsSeed.seen[-1] == "glyphs"
    assert out["run"]["models"]["glyphs"]["operators"][SeededShift.name] == {
        "name": SeededShift.name, "shift": 0.3, "scale": 2.0}


def test_placeholder_and_diffmask_share_one_explainer(tmp_path, glyphs_model, one_thread, make_method):
    adapter = glyphs_model[0]
    checkpoint = str(make_method("diffmask", adapter).checkpoint)
    cfg = BenchConfig(run="pd", results_dir=str(tmp_path), methods=("diffmask", "random"),
                      operators=("placeholder",), method_options={"diffmask": {"checkpoint": checkpoint}},
                      **TINY)
    out = run_benchmark(cfg, progress=False)
    meta = out["run"]["models"]["glyphs"]
    assert out["failures"] == []
    assert meta["operators"]["placeholder"]["checkpoint"] == checkpoint
    assert meta["diffmask"]["placeholder"]["checkpoint"] == checkpoint
