"""Packaging as users expect: every imported third-party package is declared, py.typed and the
configs ship, and `patchbench --help` answers without importing torch."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import patchbench

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "patchbench"
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "pytorch_grad_cam": "grad-cam", "cv2": "opencv-python-headless"}


def imported_top_levels() -> set[str]:
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values()
                                         for d in extra)]
    return {s.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower() for s in specs}


def test_every_imported_third_party_package_is_declared():
    stdlib = set(sys.stdlib_module_names) | {"patchbench", "__future__"}
    third_party = {DISTRIBUTION.get(n, n).lower() for n in imported_top_levels() - stdlib}
    assert {"torch", "pillow", "safetensors"} <= third_party  # the scan sees real imports
    assert third_party - declared() == set()


def test_py_typed_configs_and_templates_ship_with_the_package():
    package = Path(patchbench.__file__).parent
    assert (package / "py.typed").is_file()
    assert {p.stem for p in (package / "configs").glob("*.toml")} >= {"default", "ci"}
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert set(data["patchbench"]) == {"configs/*.toml", "bench/templates/*", "py.typed"}
    assert {p.name for p in (package / "bench" / "templates").iterdir()} == {"report.html", "report.css"}


def test_help_does_not_import_torch(tmp_path):
    code = ("import sys\nfrom patchbench.cli import main\n"
            "for args in (['--help'], ['bench', '--help'], ['speed', '--help'], ['train', '--help'],\n"
            "             ['list', 'methods'], ['list', 'operators', 'd*']):\n"
            "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: patchbench" in out.stdout
    assert "rollout                  Attention rollout" in out.stdout and "drop   " in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_public_api_is_exported_from_the_top_level_package():
    import importlib

    for name in patchbench.__all__:
        obj = getattr(patchbench, name)
        if name != "__version__":
            assert obj is getattr(importlib.import_module(patchbench._API[name]), name)
    assert callable(patchbench.run_benchmark) and "faithfulness_curves" in dir(patchbench)


def test_the_torch_free_catalogue_equals_the_registries():
    from patchbench.catalogue import builtins
    from patchbench.datasets import DATASETS
    from patchbench.methods import METHODS
    from patchbench.models import MODELS, OPERATORS

    registries = {"methods": METHODS, "datasets": DATASETS, "operators": OPERATORS, "models": MODELS}
    for kind, registry in registries.items():
        # not plugins of other tests, nor maps:<file> methods registered when a run reads them
        live = {n: ((registry.get(n).__doc__ or "").strip().splitlines() or [""])[0] for n in registry.list()
                if registry.get(n).__module__.startswith("patchbench.") and ":" not in n}
        assert builtins()[kind] == live, kind
    assert len(builtins()["methods"]) >= 12 and "mean" in builtins()["operators"]


def test_messages_go_through_logging(tmp_path, capsys):
    import logging

    from patchbench.methods import plugins

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("patchbench")
    level = log.level
    log.addHandler(handler)
    try:
        log.setLevel(logging.ERROR)  # a user quiets patchbench: nothing reaches stderr
        plugins.load_all([str(tmp_path / "first_missing.py")])
        assert records == [] and capsys.readouterr().err == ""
        log.setLevel(logging.INFO)
        plugins.load_all([str(tmp_path / "second_missing.py")])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert [r.levelname for r in records] == ["WARNING"] and records[0].name == "patchbench.methods.plugins"
    assert "second_missing.py failed to load" in records[0].getMessage()
    assert "patchbench: warning: plugin" in capsys.readouterr().err  # the default handler: stderr
