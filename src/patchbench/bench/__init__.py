"""Benchmark runs: configuration, the runner, and result tables."""

from typing import Any

from patchbench.bench.config import BenchConfig


def __getattr__(name: str) -> Any:
    # the runner imports torch and timm; keep `patchbench --help` fast
    if name in ("run_benchmark", "select_samples"):
        from patchbench.bench import runner

        return getattr(runner, name)
    raise AttributeError(name)


__all__ = ["BenchConfig", "run_benchmark", "select_samples"]
