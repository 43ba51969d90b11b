"""A run as one static HTML page: tables, figures and a gallery of maps, nothing to serve.

The page is rendered from the Jinja2 template ``templates/report.html`` (with
``report.css``) with autoescape on, so every text given to it is HTML-escaped; two Markdown
marks that the tables share with ``leaderboard.md`` survive: ``**bold**`` and ```code```.
Tables are the typed :class:`~patchbench.bench.tables.Table`: numeric columns are known
from the cells, not guessed from their text.

Everything is inline (CSS in a ``<style>``, images as base64 ``data:`` URIs, no script,
no web fonts), so ``results/<run>/report.html`` opens from disk, offline, and can be mailed
as one file. A Content-Security-Policy in the page forbids loading anything else.

Gallery pictures are small PNGs with a whole number of pixels per patch (about
:data:`CELL_PIXELS` on the longer side), so every patch of a map is one solid block; the
maps are drawn over a grey copy of the image and min-max scaled per image.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from markupsafe import Markup, escape
from PIL import Image
from torch import Tensor

from patchbench.bench.tables import MARKS, Table
from patchbench.utils import atomic_path

__all__ = ["MARKS", "Gallery", "Section", "Table", "render_report", "write_report"]

CELL_PIXELS = 96  # gallery pictures: about this many pixels on the longer side
COLORMAP = "inferno"  # perceptually uniform, dark = low, bright = high
HEAT_ALPHA = 0.65  # weight of the map's colour over the grey image
PALETTE = 128  # map and ground-truth pictures with more colours are quantised to this many
HEADER_BACKGROUND = "#2f4a66"
MARK_STYLES = {  # class -> CSS declarations
    "best": "background: #c6ebd0; font-weight: 700;",
    "tie": "background: #ecf7ef;",
    "worse": "color: #6b7480;",
    "fail": "background: #f5c2bd;",
    "flag": "background: #f5c2bd;",
    "pass": "background: #a9dfb6;",
}
TRUTH_COLOUR = (0.16, 0.92, 0.33)  # tint and outline of the ground-truth patches
MISSING_COLOUR = (0.55, 0.55, 0.55)  # patches whose relevance is NaN or infinite


@dataclass
class Gallery:
    """N images of one dataset with the ground truth (when known) and every method's map.

    Attributes:
        title: Usually the dataset name.
        images: ``[N, 3, H, W]`` float displayable pixels in [0, 1].
        maps: Method name -> ``[N, Hp, Wp]`` float relevance (any scale, higher = more
            relevant; NaN or infinite patches are drawn grey).
        truth: ``[N, Hp, Wp]`` bool ground-truth patch mask, or None.
        captions: One line per image, e.g. ``"label 3 · pred 3"``.
    """

    title: str
    images: Tensor
    maps: dict[str, Tensor]
    truth: Tensor | None = None
    captions: list[str] = field(default_factory=list)


@dataclass
class Section:
    """A part of the report with its own heading and entry in the contents.

    Attributes:
        title: Heading.
        text: Paragraphs of plain text.
        tables: Shown after the text.
        figures: ``(caption, PNG bytes)`` pairs, shown after the tables.
        galleries: Shown last.
    """

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG bytes)
    galleries: list[Gallery] = field(default_factory=list)


# -- pictures ----------------------------------------------------------------------------------------


def data_uri(data: bytes) -> str:
    """Image bytes as a base64 ``data:`` URI (PNG, JPEG, GIF or SVG, told by the content)."""
    head = data[:256].lstrip()
    mime = ("image/png" if data.startswith(b"\x89PNG") else "image/jpeg" if data.startswith(b"\xff\xd8")
            else "image/gif" if data.startswith(b"GIF8")
            else "image/svg+xml" if head.startswith((b"<svg", b"<?xml")) else "image/png")
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def png_data_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def encode_png(rgb: np.ndarray, palette: int | None = None) -> bytes:
    """``[H, W, 3]`` uint8 -> PNG bytes.

    Args:
        rgb: The picture.
        palette: When given and the picture has more colours than this, it is quantised to
            that many (fast octree, no dithering): about half the size for maps over photos.
    """
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if palette and image.getcolors(palette) is None:
        image = image.quantize(palette, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def picture_size(grid: tuple[int, int] | None, image_size: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a gallery picture.

    Args:
        grid: ``(Hp, Wp)`` of the maps, or None when there are none.
        image_size: ``(H, W)`` of the images.

    Returns:
        With a grid, a whole number of pixels per patch, the longer side about
        :data:`CELL_PIXELS`; without one, the image scaled (up by a whole factor) to about
        that size.
    """
    if grid is not None:
        step = max(1, round(CELL_PIXELS / max(grid)))
        return grid[0] * step, grid[1] * step
    h, w = image_size
    if max(h, w) <= CELL_PIXELS:
        k = max(1, CELL_PIXELS // max(h, w))
        return h * k, w * k
    scale = CELL_PIXELS / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def image_pixels(image: Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image as ``[h, w, 3]`` float in [0, 1], resized to ``size``.

    Args:
        image: ``[3, H, W]`` (or ``[1, H, W]``) pixels in [0, 1]; NaN shows as black.
        size: ``(h, w)``; None keeps ``(H, W)``. Enlarged by nearest neighbour (sharp
            pixels), reduced with a Lanczos filter.
    """
    x = image.detach().float().cpu()
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"an image must be [3, H, W], got {list(x.shape)}")
    rgb = np.nan_to_num(x.expand(3, -1, -1).permute(1, 2, 0).numpy(), nan=0.0).clip(0, 1)
    if size is None or tuple(size) == rgb.shape[:2]:
        return rgb
    h, w = size
    grow = h >= rgb.shape[0] and w >= rgb.shape[1]
    pil = Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")
    pil = pil.resize((w, h), Image.Resampling.NEAREST if grow else Image.Resampling.LANCZOS)
    return np.asarray(pil, dtype=np.float64) / 255


def blocks(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[Hp, Wp, ...]`` -> ``[h, w, ...]``, each pixel taking its patch's value (solid blocks)."""
    (hp, wp), (h, w) = grid.shape[:2], size
    return grid[(np.arange(h) * hp // h)[:, None], (np.arange(w) * wp // w)[None, :]]


def scale_map(patch_map: Tensor) -> np.ndarray:
    """Min-max scaling of one map to [0, 1].

    Args:
        patch_map: ``[Hp, Wp]`` relevance, any scale.

    Returns:
        ``[Hp, Wp]`` float64: 0 at the minimum, 1 at the maximum; 0.5 everywhere for a
        constant map; NaN where the relevance is not finite.
    """
    m = patch_map.detach().cpu().double().numpy()
    finite = np.isfinite(m)
    out = np.full(m.shape, np.nan)
    if finite.any():
        lo, hi = m[finite].min(), m[finite].max()
        out[finite] = (m[finite] - lo) / (hi - lo) if hi > lo else 0.5
    return out


def heatmap(image: Tensor, patch_map: Tensor, alpha: float = HEAT_ALPHA,
            size: tuple[int, int] | None = None) -> np.ndarray:
    """A patch map over its image: each patch one solid block of colour.

    Args:
        image: ``[3, H, W]`` pixels in [0, 1].
        patch_map: ``[Hp, Wp]`` relevance, min-max scaled here (a constant map is uniform).
        alpha: Weight of the map's colour against the grey image.
        size: ``(h, w)`` of the picture; None: the image's ``(H, W)``.

    Returns:
        ``[h, w, 3]`` uint8: :data:`COLORMAP` (brighter = more relevant) over the image in grey.
    """
    size = tuple(size or image.shape[-2:])
    return _heat(_grey(image_pixels(image, size)), patch_map, alpha)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """``[h, w, 3]`` -> ``[h, w]`` luma (Rec. 601)."""
    return rgb @ np.array([0.299, 0.587, 0.114])


def _heat(grey: np.ndarray, patch_map: Tensor, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """:func:`heatmap` over an image already in grey at the picture's size."""
    from matplotlib import colormaps

    size = grey.shape
    scaled = scale_map(patch_map)
    colour = colormaps[COLORMAP](np.nan_to_num(scaled, nan=0.0))[..., :3]
    colour[np.isnan(scaled)] = MISSING_COLOUR
    out = alpha * blocks(colour, size) + (1 - alpha) * grey[..., None]
    return (out * 255).round().clip(0, 255).astype(np.uint8)


def outline(image: Tensor, truth: Tensor, size: tuple[int, int] | None = None) -> np.ndarray:
    """The image with its ground-truth patches tinted and outlined, the others dimmed.

    Args:
        image: ``[3, H, W]`` pixels in [0, 1].
        truth: ``[Hp, Wp]`` bool.
        size: ``(h, w)`` of the picture; None: the image's ``(H, W)``.

    Returns:
        ``[h, w, 3]`` uint8.
    """
    size = tuple(size or image.shape[-2:])
    pixels = image_pixels(image, size)
    mask = truth.detach().cpu().bool().numpy()
    inside = blocks(mask, size)
    green = np.array(TRUTH_COLOUR)
    out = np.where(inside[..., None], 0.65 * pixels + 0.35 * green, 0.3 * pixels)
    width = max(1, round(min(size[0] / mask.shape[0], size[1] / mask.shape[1]) / 8))
    inner = inside.copy()
    for _ in range(width):  # erosion by the 4 neighbours; the picture's border is not an edge
        padded = np.pad(inner, 1, mode="edge")
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out[inside & ~inner] = green
    return (out * 255).round().clip(0, 255).astype(np.uint8)


# -- the page ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    """An ``<img>`` of the page: a ``data:`` URI, its size in pixels (0: its own) and alt text."""

    src: str
    alt: str
    width: int = 0
    height: int = 0
    cls: str = ""


def _picture(rgb: np.ndarray, alt: str, palette: int | None = None) -> Picture:
    return Picture(png_data_uri(encode_png(rgb, palette)), alt, rgb.shape[1], rgb.shape[0])


def _colourbar(width: int = 120, height: int = 10) -> Picture:
    from matplotlib import colormaps

    ramp = colormaps[COLORMAP](np.linspace(0, 1, width))[None, :, :3].repeat(height, 0)
    return _picture((ramp * 255).round().astype(np.uint8), f"{COLORMAP} colour scale, low to high")


def _check_gallery(gallery: Gallery) -> None:
    images = gallery.images
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"gallery {gallery.title!r}: images are {list(images.shape)}, expected [N, 3, H, W]")
    n = images.shape[0]
    parts = dict(gallery.maps)
    if gallery.truth is not None:
        parts["ground truth"] = gallery.truth
    for name, m in parts.items():
        if m.ndim != 3 or m.shape[0] != n:
            raise ValueError(f"gallery {gallery.title!r}: {name!r} is {list(m.shape)}, "
                             f"expected [{n}, Hp, Wp]")


def gallery_view(gallery: Gallery) -> dict[str, Any]:
    """The pictures of a gallery, row by row, for the template.

    Returns:
        ``title, methods, has_truth, colourbar`` and ``rows``: per image its ``image``,
        ``caption``, ``truth`` (a picture or None) and ``maps`` (one picture per method).

    Raises:
        ValueError: When the images or a map do not have the shapes :class:`Gallery` documents.
    """
    _check_gallery(gallery)
    image_size = tuple(gallery.images.shape[-2:])
    grids = [tuple(m.shape[-2:]) for m in gallery.maps.values()]
    if gallery.truth is not None:
        grids.insert(0, tuple(gallery.truth.shape[-2:]))
    size = picture_size(grids[0] if grids else None, image_size)
    rows = []
    for i, image in enumerate(gallery.images):
        caption = gallery.captions[i] if i < len(gallery.captions) else ""
        shown = image_pixels(image, size)
        greys = {size: _grey(shown)}  # the image in grey per picture size
        truth = None
        if gallery.truth is not None:
            pic = outline(image, gallery.truth[i], picture_size(tuple(gallery.truth.shape[-2:]), image_size))
            truth = _picture(pic, f"ground truth {i}", PALETTE)
        maps = []
        for name, m in gallery.maps.items():
            at = picture_size(tuple(m.shape[-2:]), image_size)
            if at not in greys:  # maps on another grid than the first
                greys[at] = _grey(image_pixels(image, at))
            maps.append(_picture(_heat(greys[at], m[i]), f"{name} · image {i}", PALETTE))
        rows.append({"image": _picture((shown * 255).round().astype(np.uint8),
                                       f"image {i}: {caption}".rstrip(": ")),
                     "caption": caption, "truth": truth, "maps": maps})
    return {"title": gallery.title, "methods": list(gallery.maps), "has_truth": gallery.truth is not None,
            "colourbar": _colourbar(), "rows": rows}


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: Any) -> Markup:
    """Escaped text in which Markdown ``**bold**`` and ```code``` become HTML."""
    out = _CODE.sub(r"<code>\1</code>", str(escape(str(text))))
    return Markup(_BOLD.sub(r"<strong>\1</strong>", out))


def _plain(text: Any) -> str:
    """Text without the Markdown marks (for ``alt`` and ``title`` attributes); escaped by the template."""
    return str(text).replace("**", "").replace("`", "")


def _breakable(name: Any) -> Markup:
    """Escaped ``name`` that may wrap after ``_``, ``-``, ``.`` and ``/`` (long method names)."""
    return Markup(re.sub(r"([_\-./])", r"\1<wbr>", str(escape(str(name)))))


def _caption(text: Any) -> Markup:
    """Escaped caption that wraps only between its ``·``-separated parts."""
    parts = str(text).split(" · ")
    return Markup(" · ").join(Markup("<span>{}</span>").format(_inline(part)) for part in parts)


def _trail_columns(table: Table) -> list[bool]:
    """Per column: does a number in it carry a suffix (then every number gets a suffix slot)?"""
    width = max([len(table.header), *(len(r) for r in table.rows)])
    return [any(c < len(r) and r[c].numeric and r[c].suffix for r in table.rows) for c in range(width)]


@functools.cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("patchbench.bench", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters.update(inline=_inline, plain=_plain, breakable=_breakable, caption=_caption)
    env.globals.update(trail_columns=_trail_columns, header_background=HEADER_BACKGROUND,
                       mark_styles=MARK_STYLES,
                       truth_colour="#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in TRUTH_COLOUR)))
    return env


class _Anchors:
    """Unique, readable ``id`` values for the page's headings."""

    def __init__(self) -> None:
        self.used: set[str] = {"contents", "provenance"}

    def __call__(self, title: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:60] or "part"
        anchor, k = base, 1
        while anchor in self.used:
            k += 1
            anchor = f"{base}-{k}"
        self.used.add(anchor)
        return anchor


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``(dotted.key, value)`` pairs, in order; other values are leaves."""
    if isinstance(value, dict) and value:
        return [pair for k, v in value.items() for pair in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, value)]


def _shown(value: Any) -> str:
    if not isinstance(value, dict | list | tuple | int | float | bool | None):
        return str(value)  # str, Path, numpy scalars, dtypes...
    return json.dumps(value, default=str, ensure_ascii=False)


def _section_view(section: Section, anchor: _Anchors) -> dict[str, Any]:
    own = anchor(section.title)
    parts = [{"kind": "table", "item": t, "anchor": anchor(t.title)} for t in section.tables]
    parts += [{"kind": "gallery", "item": gallery_view(g), "anchor": anchor(g.title)}
              for g in section.galleries]
    figures = [{"caption": caption, "picture": Picture(data_uri(png), caption)}
               for caption, png in section.figures]
    return {"title": section.title, "anchor": own, "text": section.text,
            "parts": parts, "figures": figures}


def render_report(title: str, sections: list[Section], provenance: dict[str, Any]) -> str:
    """The whole report as one self-contained HTML string, from ``templates/report.html``.

    Args:
        title: Page title and top heading.
        sections: In order; each gets an entry in the contents (with links to its tables and
            galleries when it has several).
        provenance: Shown at the end, collapsed: every key of the nested dicts with its value,
            and the whole as JSON (values JSON cannot hold are shown as ``str``).

    Returns:
        The HTML page: no script, no external resource.

    Raises:
        ValueError: A gallery's images or maps do not have the documented shapes.
    """
    anchor = _Anchors()
    views = [_section_view(s, anchor) for s in sections]
    pairs = [(k, _shown(v)) for k, v in flatten(provenance)] if provenance else []
    return _environment().get_template("report.html").render(
        title=title, sections=views, provenance=pairs,
        provenance_json=json.dumps(provenance, indent=2, default=str, ensure_ascii=False))


def write_report(path: Path, title: str, sections: list[Section], provenance: dict[str, Any]) -> None:
    """Renders the report and writes it to ``path``.

    The page goes to a temporary file in the same folder, then replaces ``path`` in one
    step: ``path`` is never half-written, and a rendering error leaves it as it was.

    Args:
        path: The ``.html`` file.
        title: See :func:`render_report`.
        sections: See :func:`render_report`.
        provenance: See :func:`render_report`.
    """
    text = render_report(title, sections, provenance)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
