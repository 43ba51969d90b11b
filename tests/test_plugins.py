"""Method plugins: installed packages (entry points), --plugin files and modules, the contract kit."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from patchbench.bench import BenchConfig, run_benchmark
from patchbench.cli import main
from patchbench.methods import METHODS, Method, MethodOutputError, create_method, list_methods, plugins
from patchbench.methods.controls import RandomMethod
from patchbench.testing import ContractError, check_method, tiny_adapter

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "vargrad" / "patchbench_vargrad.py"
# the built-in methods: registered by importing patchbench.methods, before any plugin is loaded
BUILTINS = METHODS.list()
PLUGIN_MODULES = ("patchbench_plugin_", "patchbench_vargrad", "pb_test_")  # what these tests import


def _plugin_globals() -> dict:
    """plugins.py's module-level state: what was loaded, and the problems met."""
    return {k: v for k, v in vars(plugins).items()
            if not k.startswith("__") and isinstance(v, bool | list | dict | set)}


@pytest.fixture(autouse=True)
def plugin_state():
    """Plugins change the global registry and plugins.py's state: restored after each test.

    Yields a function that restores them at once (a fresh process, as far as plugins go)."""
    entries = dict(METHODS._entries)
    saved = copy.deepcopy(_plugin_globals())
    modules = set(sys.modules)

    def restore() -> None:
        METHODS._entries.clear()
        METHODS._entries.update(entries)
        for name, value in copy.deepcopy(saved).items():
            current = getattr(plugins, name)
            if isinstance(current, list):  # in place: callers may hold the object
                current[:] = value
            elif isinstance(current, dict | set):
                current.clear()
                current.update(value)
            else:
                setattr(plugins, name, value)
        for name in set(sys.modules) - modules:  # only the plugins' own: not e.g. captum, imported lazily
            if name.startswith(PLUGIN_MODULES):
                del sys.modules[name]

    yield restore
    restore()


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def fake_install(root: Path, name: str, entry_points: str, group: str = "patchbench.methods") -> None:
    """What pip leaves in site-packages: a dist-info folder with METADATA and entry_points.txt."""
    info = root / f"{name.replace('-', '_')}-0.1.0.dist-info"
    write(info / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    text = textwrap.dedent(entry_points)
    write(info / "entry_points.txt", text if text.startswith("[") else f"[{group}]\n{text}")


def install_vargrad(root: Path) -> None:
    fake_install(root, "patchbench-vargrad", "vargrad = patchbench_vargrad:VarGrad\n")
    shutil.copy(EXAMPLE, root / EXAMPLE.name)


# -- installed plugins ---------------------------------------------------------------------------


def test_installed_plugin_is_listed_and_created_by_name(tmp_path, monkeypatch):
    install_vargrad(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "vargrad" not in METHODS
    assert plugins.load_entry_points(force=True) == []
    assert "vargrad" in list_methods()
    cls = METHODS.get("vargrad")
    assert cls.__name__ == "VarGrad" and cls.__module__ == "patchbench_vargrad"
    adapter = tiny_adapter()
    method = create_method("vargrad", adapter, n_samples=2)
    maps = method.attribute(torch.zeros(2, 3, *adapter.img_size), torch.tensor([0, 1]))
    assert maps.shape == (2, *adapter.grid)
    assert method.config() == {"name": "vargrad", "n_samples": 2, "noise": 0.15, "seed": 0}


def test_installed_plugin_in_the_command_line_list(tmp_path):
    install_vargrad(tmp_path)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-m", "patchbench", "list", "methods"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("vargrad ") for line in lines), out.stdout
    assert "Variance of the target" in next(line for line in lines if line.startswith("vargrad"))
    assert all(any(line.startswith(f"{n} ") for line in lines) for n in BUILTINS)
    assert "warning" not in out.stderr


def test_entry_points_are_loaded_once_unless_forced(tmp_path, monkeypatch):
    plugins.load_entry_points()  # whatever is installed for real: now loaded
    install_vargrad(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugins.load_entry_points() == [] and "vargrad" not in METHODS
    assert plugins.load_entry_points(force=True) == [] and "vargrad" in METHODS
    assert plugins.load_entry_points(force=True) == []  # the same class again: no conflict


# -- the contract kit ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_class():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_pb_test_vargrad", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not in sys.modules: nothing to clean up
    return module.VarGrad


def test_example_plugin_passes_the_contract_kit(example_class, one_thread):
    maps = check_method(example_class, n_samples=4)
    assert maps.shape == (4, 4, 4) and maps.dtype == torch.float32
    assert maps.abs().sum() > 0


def test_builtins_are_known():
    assert {"attention", "diffmask", "gradcam", "integrated_gradients", "random", "rollout"} <= set(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_method_passes_the_contract_kit(name, tmp_path, one_thread):
    from patchbench.methods.diffmask_train import DiffMaskConfig, save_explainer, train_diffmask

    adapter = tiny_adapter()
    options = {}
    if name == "integrated_gradients":
        options["n_steps"] = 8
    if name == "diffmask":
        cfg = DiffMaskConfig(steps=3, batch_size=8)
        g = torch.Generator().manual_seed(1)
        images = adapter.normalize(torch.rand(16, 3, *adapter.img_size, generator=g))
        explainer, _ = train_diffmask(adapter, images, cfg, progress=False)
        path = tmp_path / "explainer.pt"
        save_explainer(path, explainer, adapter, "random", cfg, {})
        options["checkpoint"] = str(path)
        adapter = tiny_adapter()  # the kit's model as found: no traces of the training
    maps = check_method(name, adapter, **options)
    assert maps.shape == (4, *adapter.grid)


def patch_means(method: Method, images: torch.Tensor) -> torch.Tensor:
    """A per-image map that varies by image: mean pixel value of every patch."""
    return F.adaptive_avg_pool2d(images.mean(1, keepdim=True), method.adapter.grid).squeeze(1)


class LeaksHook(Method):
    def _attribute(self, images, target):
        self.adapter.model.register_forward_hook(lambda *_: None)
        return patch_means(self, images)


class LeaksHookOnError(Method):
    """Removes its hook, but not in a ``finally``: a failing model leaves it behind."""

    def _attribute(self, images, target):
        handle = self.adapter.model.blocks[0].register_forward_hook(lambda *_: None)
        self.adapter.model(images)
        handle.remove()
        return patch_means(self, images)


class BatchNormalised(Method):
    def _attribute(self, images, target):
        maps = patch_means(self, images)
        return maps / maps.abs().max()  # the maximum of the whole batch


class Unseeded(Method):
    def _attribute(self, images, target):
        g = torch.Generator().manual_seed(int.from_bytes(os.urandom(6), "little"))  # not seed_everything's
        return patch_means(self, images) + torch.rand(images.shape[0], *self.adapter.grid, generator=g)


class WrongShape(Method):
    def _attribute(self, images, target):
        return patch_means(self, images)[:, :, :-1]


class LeavesGradients(Method):
    uses_gradients = True

    def _attribute(self, images, target):
        x = images.detach().clone().requires_grad_(True)
        self.adapter.model(x).gather(1, target[:, None]).sum().backward()
        return patch_means(self, x.grad.abs())


class LeavesTrainingMode(Method):
    def _attribute(self, images, target):
        self.adapter.model.train()
        return patch_means(self, images)


class FreezesModel(Method):
    def _attribute(self, images, target):
        self.adapter.model.requires_grad_(False)
        return patch_means(self, images)


@pytest.mark.parametrize("cls,needle", [
    (LeaksHook, "hooks left on the model: 1"),
    (LeaksHookOnError, "hooks left on the model after an exception: 1"),
    (BatchNormalised, "depend on the rest of the batch"),
    (Unseeded, "not deterministic under a seed"),
    (LeavesGradients, "gradients were left"),
    (LeavesTrainingMode, "left in training mode"),
    (FreezesModel, "requires_grad flags of the model were changed"),
])
def test_contract_kit_catches_broken_methods(cls, needle, one_thread):
    with pytest.raises(ContractError, match=f"method '{cls.__name__}' breaks the contract") as e:
        check_method(cls, tiny_adapter())
    assert needle in str(e.value)


def test_contract_kit_catches_wrong_shapes(one_thread):
    with pytest.raises((MethodOutputError, ContractError), match=r"shape \[4, 4, 3\], expected \[4, 4, 4\]"):
        check_method(WrongShape, tiny_adapter())


def test_contract_kit_passes_a_well_behaved_method(one_thread):
    class PatchMeans(Method):
        def _attribute(self, images, target):
            return patch_means(self, images)

    assert check_method(PatchMeans).shape == (4, 4, 4)


# -- --plugin path/to/file.py, module, module:object ---------------------------------------------------


DECORATED = textwrap.dedent("""
    import torch
    from patchbench.methods import Method, register_method

    @register_method("{name}")
    class Mine(Method):
        '''{doc}'''

        def _attribute(self, images, target):
            return torch.zeros(images.shape[0], *self.adapter.grid)
""")

BARE = textwrap.dedent("""
    import torch
    from patchbench.methods import Method

    def helper():
        return 1

    class NoAttribute(Method):
        pass

    class {cls}(Method):
        '''Constant maps.'''

        def _attribute(self, images, target):
            return torch.ones(images.shape[0], *self.adapter.grid)
""")


def test_plugin_file_defining_a_method_class():
    assert plugins.load_plugin(str(EXAMPLE)) == []
    cls = METHODS.get("vargrad")
    assert cls.__name__ == "VarGrad" and cls.__module__.startswith("patchbench_plugin_patchbench_vargrad")
    assert "vargrad" in list_methods()
    assert plugins.load_plugin(str(EXAMPLE)) == [] and METHODS.get("vargrad") is cls  # once only


def test_plugin_file_registering_its_method(tmp_path):
    path = write(tmp_path / "mine.py", DECORATED.format(name="mine", doc="My method."))
    before = set(METHODS.list())
    assert plugins.load_plugin(str(path)) == []
    assert set(METHODS.list()) - before == {"mine"}
    adapter = tiny_adapter()
    images, target = torch.zeros(3, 3, *adapter.img_size), torch.zeros(3).long()
    maps = create_method("mine", adapter).attribute(images, target)
    assert maps.shape == (3, *adapter.grid)
    assert plugins.load_plugin(str(path)) == [] and set(METHODS.list()) - before == {"mine"}


def test_plugin_module_and_module_object(tmp_path, monkeypatch):
    write(tmp_path / "pb_test_bare.py", BARE.format(cls="Ones"))
    write(tmp_path / "pb_test_decorated.py", DECORATED.format(name="decorated", doc="Zeros."))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugins.load_plugin("pb_test_bare:Ones") == []
    cls = METHODS.get("ones")  # no name of its own: the class name
    assert cls.__name__ == "Ones" and cls.name == "ones"
    assert plugins.load_plugin("pb_test_bare:Ones") == []
    assert plugins.load_plugin("pb_test_decorated") == []
    assert METHODS.get("decorated").__doc__ == "Zeros."


def test_plugin_module_defining_classes_registers_each(tmp_path, monkeypatch):
    write(tmp_path / "pb_test_bare2.py", BARE.format(cls="Ones"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugins.load_plugin("pb_test_bare2") == []  # NoAttribute is skipped, Ones registered
    assert METHODS.get("ones").__name__ == "Ones" and "noattribute" not in METHODS


def test_two_plugin_files_with_the_same_name(tmp_path):
    a = write(tmp_path / "a" / "method.py", DECORATED.format(name="from_a", doc="A."))
    b = write(tmp_path / "b" / "method.py", DECORATED.format(name="from_b", doc="B."))
    assert plugins.load_plugin(str(a)) == [] and plugins.load_plugin(str(b)) == []
    assert "from_a" in METHODS and "from_b" in METHODS  # the second file is run too


# -- bad plugins: reported by name, the rest goes on ------------------------------------------------


def test_bad_plugins_are_reported_and_the_rest_is_loaded(tmp_path, monkeypatch):
    broken = write(tmp_path / "broken_plugin.py", "import os\nraise ImportError('needs the foo package')\n")
    empty = write(tmp_path / "empty_plugin.py", "from patchbench.methods import Method\nX = 1\n")
    write(tmp_path / "pb_test_helpers.py", BARE.format(cls="Fine"))
    monkeypatch.syspath_prepend(str(tmp_path))
    original = METHODS.get("random")

    p = plugins.load_plugin(str(broken))
    assert len(p) == 1 and str(broken) in p[0] and "failed to load" in p[0]
    assert "ImportError: needs the foo package" in p[0]
    assert not [m for m in sys.modules if m.startswith("patchbench_plugin_broken_plugin")]
    p = plugins.load_plugin(str(tmp_path / "missing.py"))
    assert len(p) == 1 and "missing.py failed to load: FileNotFoundError" in p[0]
    p = plugins.load_plugin(str(empty))
    assert len(p) == 1 and "empty_plugin.py defines no Method subclass" in p[0]
    p = plugins.load_plugin("pb_test_helpers:helper")
    assert len(p) == 1 and p[0].startswith("plugin pb_test_helpers:helper: ")
    assert "not a patchbench Method subclass" in p[0]
    p = plugins.load_plugin("pb_test_helpers:NoAttribute")
    assert len(p) == 1 and "pb_test_helpers:NoAttribute" in p[0]
    assert "NoAttribute does not override _attribute" in p[0]
    p = plugins.load_plugin("pb_test_helpers:Missing")
    assert len(p) == 1 and "failed to load: AttributeError" in p[0]
    p = plugins.load_plugin("no_such_module_pb:Thing")
    assert len(p) == 1 and "failed to load: ModuleNotFoundError" in p[0]
    assert len(plugins.PROBLEMS) >= 7 and plugins.PROBLEMS[-7:][0].startswith(f"plugin {broken}")
    assert plugins.load_plugin(str(broken)) == []  # reported once

    assert plugins.load_plugin("pb_test_helpers:Fine") == []
    assert METHODS.get("fine").__name__ == "Fine"
    assert METHODS.get("random") is original is RandomMethod
    assert "noattribute" not in METHODS and "helper" not in METHODS


def test_plugin_failing_after_registering_leaves_nothing(tmp_path):
    source = DECORATED.format(name="half", doc="Half.") + "raise ImportError('late')\n"
    path = write(tmp_path / "half.py", source)
    p = plugins.load_plugin(str(path))
    assert len(p) == 1 and "half.py failed to load: ImportError: late" in p[0]
    assert "half" not in METHODS


def test_plugin_taking_a_registered_name_is_refused(tmp_path):
    path = write(tmp_path / "clash.py", DECORATED.format(name="random", doc="Not random."))
    p = plugins.load_plugin(str(path))
    assert len(p) == 1 and "clash.py failed to load" in p[0]
    assert "'random' is already registered by patchbench.methods.controls.RandomMethod" in p[0]
    assert METHODS.get("random") is RandomMethod


def test_bad_entry_points_are_reported_and_the_rest_is_loaded(tmp_path, monkeypatch):
    fake_install(tmp_path, "pb-test-mixed", """\
        random = pb_test_mixed:OtherRandom
        broken = pb_test_broken:Thing
        helper = pb_test_mixed:helper
        lazy = pb_test_mixed:NoAttribute
        good = pb_test_mixed:Good
    """)
    write(tmp_path / "pb_test_mixed.py", BARE.format(cls="OtherRandom") + "Good = OtherRandom\n")
    write(tmp_path / "pb_test_broken.py", "raise ImportError('no foo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    problems = plugins.load_entry_points(force=True)
    assert len(problems) == 4, problems
    by_name = {p.split()[1]: p for p in problems}
    assert set(by_name) == {"random", "broken", "helper", "lazy"}
    clash = by_name["random"]
    assert clash.startswith("plugin random = pb_test_mixed:OtherRandom (package pb-test-mixed): ")
    assert "already registered" in clash
    assert "patchbench.methods.controls.RandomMethod" in clash and "pb_test_mixed.OtherRandom" in clash
    assert "failed to load: ImportError: no foo" in by_name["broken"]
    assert "not a patchbench Method subclass" in by_name["helper"]
    assert "does not override _attribute" in by_name["lazy"]
    assert plugins.PROBLEMS[-4:] == problems

    assert METHODS.get("good").__name__ == "OtherRandom"
    assert METHODS.get("random") is RandomMethod
    assert not {"broken", "helper", "lazy"} & set(METHODS.list())


def test_list_methods_warns_about_bad_installed_plugins(tmp_path, monkeypatch):
    fake_install(tmp_path, "pb-test-bad", "bad = pb_test_nowhere:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    with pytest.warns(UserWarning, match="plugin bad = pb_test_nowhere:Thing .*failed to load"):
        names = list_methods()
    assert set(BUILTINS) <= set(names) and "bad" not in names


# -- command line ------------------------------------------------------------------------------------


def test_list_with_a_bad_plugin_warns_and_lists(tmp_path, capsys):
    broken = write(tmp_path / "broken_plugin.py", "raise ImportError('needs foo')\n")
    assert main(["list", "methods", "--plugin", str(broken), "--plugin", str(EXAMPLE)]) == 0
    out, err = capsys.readouterr()
    assert f"patchbench: warning: plugin {broken} failed to load: ImportError: needs foo" in err
    names = [line.split()[0] for line in out.splitlines()]
    assert names == sorted([*BUILTINS, "vargrad"])


def test_bench_with_a_plugin(tmp_path, capsys, glyphs_model, one_thread):
    broken = write(tmp_path / "broken_plugin.py", "raise ImportError('needs foo')\n")
    results = tmp_path / "results"
    code = main(["bench", "--plugin", str(EXAMPLE), "--plugin", str(broken), "--datasets", "glyphs",
                 "--methods", "vargrad,random", "--operators", "mean", "--n-images", "6", "--steps", "2",
                 "--results-dir", str(results), "--run", "p", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count(f"patchbench: warning: plugin {broken} failed to load") == 1
    scores = pd.read_csv(results / "p" / "scores.csv")
    assert set(scores.method) == {"vargrad", "random"}
    assert (scores[scores.method == "vargrad"].groupby(["operator", "metric"]).size() == 6).all()
    run = json.loads((results / "p" / "run.json").read_text())
    assert run["config"]["plugins"] == [str(EXAMPLE), str(broken)]
    assert any(str(broken) in p for p in run["plugin_problems"])
    assert not any("vargrad" in p for p in run["plugin_problems"])
    assert run["failures"] == []


EDITED = """\
import torch.nn.functional as F
from patchbench.methods import Method


class Edited(Method):
    name = "edited"

    def _attribute(self, images, target):
        maps = F.adaptive_avg_pool2d(images.mean(1, keepdim=True), self.adapter.grid).squeeze(1)
        return {sign}maps
"""


def test_runner_loads_config_plugins_and_recomputes_when_the_plugin_changes(
        tmp_path, glyphs_model, one_thread, plugin_state, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    path = write(tmp_path / "edited.py", EDITED.format(sign=""))
    broken = write(tmp_path / "broken_plugin.py", "raise ImportError('needs foo')\n")

    def run(name: str) -> dict:
        cfg = BenchConfig(run=name, results_dir=str(tmp_path / "results"), datasets=("glyphs",),
                          methods=("edited", "random"), operators=("mean",), n_images=6, steps=2,
                          plugins=(str(path), str(broken)))
        out = run_benchmark(cfg, progress=False)  # loads the plugins itself: no CLI involved
        plugin_state()  # the next run as in a new process
        return out

    def srg(out: dict, method: str) -> pd.Series:
        s = out["scores"]
        return s[(s.method == method) & (s.metric == "srg")].set_index("sample_id").value

    a = run("a")
    assert a["failures"] == []
    # 2 methods x (maps + curves), the ground-truth mask's curves, the sanity check
    assert a["run"]["chunks"]["reused"] == 0 and a["run"]["chunks"]["computed"] == 4 + 1 + 1
    problems = a["run"]["plugin_problems"]
    assert any(p.startswith(f"plugin {broken} failed to load") for p in problems)
    assert not any(str(path) in p for p in problems)
    assert "edited" not in METHODS

    b = run("b")  # nothing changed: all reused
    assert b["run"]["chunks"]["reused"] == 6 and b["run"]["chunks"]["computed"] == 0
    pd.testing.assert_series_equal(srg(a, "edited"), srg(b, "edited"))

    write(path, EDITED.format(sign="-"))  # the plugin's code changes: its results are recomputed
    c = run("c")
    # the plugin's maps, curves and the sanity check (keyed by every method's code) again
    assert c["run"]["chunks"]["reused"] == 3 and c["run"]["chunks"]["computed"] == 3
    pd.testing.assert_series_equal(srg(a, "random"), srg(c, "random"))
    assert (srg(a, "edited") - srg(c, "edited")).abs().max() > 1e-3  # reversed maps, new scores


def test_bench_with_plugins_from_a_config_file_and_the_command_line(tmp_path, capsys, glyphs_model,
                                                                      one_thread):
    config = write(tmp_path / "run.toml", f"""\
        plugins = ["{EXAMPLE}"]
        datasets = ["glyphs"]
        methods = ["varg*", "random"]
        operators = ["mean"]
        n_images = 4
        steps = 2
    """)
    mine = write(tmp_path / "mine.py", DECORATED.format(name="mine", doc="Zeros."))
    results = tmp_path / "results"
    code = main(["bench", "--config", str(config), "--plugin", str(mine), "--methods", "varg*,mine",
                 "--results-dir", str(results), "--run", "c", "--quiet"])
    assert code == 0, capsys.readouterr().err
    run = json.loads((results / "c" / "run.json").read_text())
    assert run["config"]["plugins"] == [str(EXAMPLE), str(mine)]
    assert run["config"]["methods"] == ["vargrad", "mine"]
    assert set(pd.read_csv(results / "c" / "scores.csv").method) == {"vargrad", "mine"}


def test_run_reports_only_its_own_plugin_problems(tmp_path, glyphs_model, one_thread):
    broken = write(tmp_path / "broken_plugin.py", "raise ImportError('needs foo')\n")
    small = dict(results_dir=str(tmp_path), datasets=("glyphs",), methods=("random",), operators=("mean",),
                 n_images=4, steps=2)
    a = run_benchmark(BenchConfig(run="a", plugins=(str(broken),), **small), progress=False)
    assert any(str(broken) in p for p in a["run"]["plugin_problems"])
    b = run_benchmark(BenchConfig(run="b", **small), progress=False)  # names no plugin
    assert not any(str(broken) in p for p in b["run"]["plugin_problems"])
    c = run_benchmark(BenchConfig(run="c", plugins=(str(broken),), **small), progress=False)
    assert c["run"]["plugin_problems"] == a["run"]["plugin_problems"]  # loaded once, reported each time


OTHER_KINDS = """\
    import torch

    from patchbench.datasets.synthetic import ToyCount
    from patchbench.models.removal import PixelOperator


    class Grey(PixelOperator):
        \"\"\"Patches removed to mid-grey.\"\"\"

        name = "pb-test-grey"

        def baseline(self, adapter, images, seeds):
            return torch.full_like(images, 0.5)


    class SmallCount(ToyCount):
        \"\"\"toy-count under another name.\"\"\"


    def helper():
        return None
"""

SCORE_MODULE = """\
    from patchbench.metrics.scores import register_score


    @register_score("pb_test_final_p", "final p", True, "faithfulness", 0.1, "last deletion point",
                    curves=("deletion",))
    def final_p(c):
        return c.prob["deletion"][:, -1]
"""


def test_entry_points_of_operators_datasets_and_scores(tmp_path, monkeypatch):
    from patchbench.datasets import DATASETS
    from patchbench.metrics.scores import SCORES
    from patchbench.models import OPERATORS

    write(tmp_path / "pb_test_kinds.py", OTHER_KINDS)
    write(tmp_path / "pb_test_kinds_scores.py", SCORE_MODULE)
    fake_install(tmp_path, "pb-test-kinds", ("""\
        [patchbench.operators]
        pb-test-grey = pb_test_kinds:Grey
        pb-test-helper = pb_test_kinds:helper
        [patchbench.datasets]
        pb-test-small = pb_test_kinds:SmallCount
        [patchbench.scores]
        pb-test-scores = pb_test_kinds_scores
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = [(r, dict(r._entries)) for r in (OPERATORS, DATASETS, SCORES)]
    try:
        problems = plugins.load_entry_points(force=True)
        assert OPERATORS.get("pb-test-grey").__name__ == "Grey"
        assert DATASETS.get("pb-test-small").__name__ == "SmallCount"
        assert SCORES.get("pb_test_final_p").label == "final p"
        assert len(problems) == 1 and problems[0].startswith(
            "plugin [patchbench.operators] pb-test-helper = pb_test_kinds:helper (package pb-test-kinds): "
            "expected a RemovalOperator subclass"), problems
        assert "pb-test-helper" not in OPERATORS
    finally:
        for registry, entries in saved:
            registry._entries.clear()
            registry._entries.update(entries)
