"""patchbench: which attribution method is faithful to my Vision Transformer?

The public API, importable from here (loaded on first use, so ``import patchbench`` and
``patchbench --help`` stay fast)::

    from patchbench import evaluate       # names or objects in, the results out
    from patchbench import BenchConfig, run_benchmark                 # a whole run
    from patchbench import load_model, create_method, create_operator  # the parts
    from patchbench import faithfulness_curves, prepare_reference
"""

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("patchbench")
except metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

# name -> module that defines it
_API = {
    "evaluate": "patchbench.api",
    "BenchConfig": "patchbench.bench.config",
    "run_benchmark": "patchbench.bench.runner",
    "RunContext": "patchbench.context",
    "Method": "patchbench.methods",
    "METHODS": "patchbench.methods",
    "create_method": "patchbench.methods",
    "list_methods": "patchbench.methods",
    "register_method": "patchbench.methods",
    "RemovalOperator": "patchbench.models",
    "OPERATORS": "patchbench.models",
    "create_operator": "patchbench.models",
    "list_operators": "patchbench.models",
    "ImageAdapter": "patchbench.models",
    "ViTAdapter": "patchbench.models",
    "load_model": "patchbench.models",
    "create_model": "patchbench.models.hub",
    "DATASETS": "patchbench.datasets",
    "create_dataset": "patchbench.datasets",
    "list_datasets": "patchbench.datasets",
    "SCORES": "patchbench.metrics",
    "register_score": "patchbench.metrics",
    "faithfulness_curves": "patchbench.metrics",
    "prepare_reference": "patchbench.metrics",
    "clean_logits": "patchbench.metrics",
    "check_method": "patchbench.testing",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'patchbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])


__all__ = ["__version__", *_API]
