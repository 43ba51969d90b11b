"""Memory: chunk sizes from a memory budget, and peak-memory readings for reports.

The faithfulness harness runs (image, step) rows through the model in chunks. How many rows
fit is estimated from the model itself: one forward pass of one row with a hook on every
leaf module records the largest input + output a layer holds at once, to which the pixel
copies of the row (image, baseline, composite) and, for a ViT, the attention matrices are
added. No table of model sizes, so it works for any classifier.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path

import torch
from torch import Tensor

from patchbench.models.adapter import ImageAdapter

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """``"512MiB"``, ``"2GB"``, ``"1.5g"`` or a plain number of bytes, as an int.

    Raises:
        ValueError: On anything else, listing the units understood.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 512MiB, 2GB or 1.5GiB "
                         f"(units: {', '.join(u for u in _UNITS if u)})")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _nbytes(obj: object) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def _num_heads(block: torch.nn.Module) -> int:
    for module in block.modules():
        for name in ("num_heads", "num_attention_heads"):  # timm, Hugging Face
            if isinstance(getattr(module, name, None), int):
                return getattr(module, name)
    return 1


@torch.no_grad()
def row_bytes(adapter: ImageAdapter, image: Tensor) -> int:
    """Estimated peak working memory of one row of a forward pass, in bytes.

    Args:
        adapter: The model.
        image: One model input ``[1, 3, H, W]`` (or more; only the first is used).

    Returns:
        Bytes: three pixel copies of the row, twice the largest (input + output) of any leaf
        module, and for a ViT every head's attention matrix twice (scores and softmax).
    """
    image = image[:1]
    largest = [0]

    def hook(module: torch.nn.Module, inputs: object, output: object) -> None:
        largest[0] = max(largest[0], _nbytes(inputs) + _nbytes(output))

    leaves = [m for m in adapter.model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        adapter.logits(image)
    finally:
        for h in handles:
            h.remove()
    pixels = image.numel() * image.element_size()
    attention = 0
    if adapter.is_vit:
        tokens = adapter.num_patches + adapter.num_prefix_tokens
        attention = 2 * _num_heads(adapter.blocks[0]) * tokens**2 * image.element_size()
    return 3 * pixels + 2 * largest[0] + attention


def chunk_rows(adapter: ImageAdapter, image: Tensor, budget: int, cap: int | None = None) -> int:
    """Rows per forward pass that fit in ``budget`` bytes (at most ``cap``).

    Raises:
        ValueError: If not even one row fits, saying how much one row needs.
    """
    per_row = row_bytes(adapter, image)
    rows = budget // per_row
    if rows < 1:
        raise ValueError(f"a memory budget of {format_bytes(budget)} is less than one forward row of this "
                         f"model needs (about {format_bytes(per_row)}); raise --memory-budget")
    return int(min(rows, cap) if cap else rows)


# rows per forward pass when none is given: on a CPU, small batches stay in cache and larger
# ones are no faster (measured in `patchbench speed`); a GPU wants large ones
DEFAULT_ROWS = {"cpu": 64, "cuda": 1024}


def choose_chunk(adapter: ImageAdapter, image: Tensor, budget: int | None = None,
                 rows: int | None = None) -> int:
    """Rows per forward pass: ``rows`` if given, else the device's default, and within ``budget``.

    On a GPU without a budget, half of the currently free GPU memory is the budget.

    Args:
        adapter: The model (on its device).
        image: A model input ``[1, 3, H, W]`` on the same device.
        budget: Bytes the forward passes may use, or None.
        rows: An explicit upper bound on the rows per pass, or None for the device default.
    """
    device = image.device
    cap = rows or DEFAULT_ROWS.get(device.type, DEFAULT_ROWS["cpu"])
    if budget is None and device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // 2
    return cap if budget is None else chunk_rows(adapter, image, budget, cap)


def reset_peak_rss() -> bool:
    """Resets the process's peak resident set size (Linux only); True if it was reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (since start or the last reset)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
