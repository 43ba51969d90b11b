"""A run as one static HTML page: tables, figures and a gallery of maps, nothing to serve.

Everything is inline (CSS in a ``<style>``, images as base64 ``data:`` URIs, no script,
no web fonts), so ``results/<run>/report.html`` opens from disk, offline, and can be mailed
as one file. A Content-Security-Policy in the page forbids loading anything else.

All text given to the renderer is HTML-escaped. Two Markdown marks that the leaderboard
tables share with ``leaderboard.md`` survive: ``**bold**`` and ```code```.

Gallery pictures are small PNGs with a whole number of pixels per patch (about
:data:`CELL_PIXELS` on the longer side), so every patch of a map is one solid block; the
maps are drawn over a grey copy of the image and min-max scaled per image.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from patchbench.utils import atomic_path

CELL_PIXELS = 96  # gallery pictures: about this many pixels on the longer side
MARKS = ("", "best", "tie", "worse", "fail", "pass", "flag")
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
class Table:
    """A rendered table: cells are already-formatted strings.

    Attributes:
        title: Heading of the table.
        header: Column names.
        rows: Cells, one list per row (normally as long as ``header``).
        notes: Lines printed under the table.
        marks: Optional CSS class per cell, the shape of ``rows``: one of :data:`MARKS`.
    """

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    marks: list[list[str]] | None = None


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


CSS = """
:root { color-scheme: light; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       color: #1d232a; background: #fff; margin: 0 auto; max-width: 1560px; padding: 10px 28px 60px; }
h1 { font-size: 24px; margin: 14px 0 8px; }
h2 { font-size: 19px; margin: 34px 0 8px; border-bottom: 2px solid #d5dbe1; padding-bottom: 3px; }
h3 { font-size: 15px; margin: 22px 0 6px; }
p { margin: 6px 0; max-width: 1100px; }
a { color: #1f5f9e; text-decoration: none; } a:hover { text-decoration: underline; }
code { font: 12.5px ui-monospace, "DejaVu Sans Mono", monospace; background: #eef1f4;
       padding: 0 3px; border-radius: 3px; }
nav.toc { background: #f5f7f9; border: 1px solid #e2e6ea; border-radius: 6px; padding: 8px 16px;
          margin: 8px 0 4px; max-width: 1100px; }
nav.toc ol { margin: 4px 0; padding-left: 22px; } nav.toc li { margin: 2px 0; }
nav.toc .sub { color: #6b7480; font-size: 12px; } nav.toc .sub a { color: #3f6f9c; }
.wrap { overflow-x: auto; max-width: 100%; }
table.scores { border-collapse: collapse; margin: 4px 0 6px; font-size: 13px; }
table.scores th { background: HEADER; color: #fff; font-weight: 600; padding: 5px 10px;
                  text-align: left; white-space: nowrap; }
table.scores td { border-bottom: 1px solid #e2e6ea; padding: 3px 10px; white-space: nowrap; }
table.scores tr:hover td { box-shadow: inset 0 0 0 9999px rgba(47, 74, 102, 0.06); }
table.scores .num { text-align: right; font-variant-numeric: tabular-nums; }
table.scores .trail { display: inline-block; width: 1.2em; text-align: left; padding-left: 0.2em; }
MARKS
.note { color: #56606b; font-size: 12px; max-width: 1100px; margin: 3px 0; }
figure { margin: 10px 0; } figure img { max-width: 100%; height: auto; border: 1px solid #e2e6ea; }
figcaption { color: #56606b; font-size: 12px; }
.legend { display: flex; align-items: center; gap: 8px; color: #56606b; font-size: 12px;
          margin: 2px 0 6px; flex-wrap: wrap; }
.legend img { image-rendering: pixelated; border: 1px solid #c9d0d6; }
.legend .swatch { display: inline-block; width: 12px; height: 12px; border: 2px solid TRUTH;
                  background: rgba(41, 235, 84, 0.35); vertical-align: -2px; }
table.gallery { border-collapse: separate; border-spacing: 3px; margin: 4px 0 16px; }
table.gallery th { font-size: 11.5px; font-weight: 600; padding: 2px 2px 4px; width: 100px; max-width: 100px;
                   overflow-wrap: anywhere; vertical-align: bottom; text-align: center; }
table.gallery th.truth, table.gallery td.truth { padding-right: 8px; }
table.gallery td { padding: 0; vertical-align: top; text-align: center; }
table.gallery td.image { padding-right: 8px; }
table.gallery img { image-rendering: pixelated; display: block; margin: 0 auto; }
table.gallery .caption { font-size: 11px; color: #56606b; max-width: 110px; line-height: 1.25;
                         margin: 2px 0 4px; overflow-wrap: anywhere; }
table.gallery .caption span { white-space: nowrap; }
details { margin: 6px 0; } summary { cursor: pointer; color: #1f5f9e; }
table.provenance { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
table.provenance th { text-align: left; font-weight: 600; padding: 2px 14px 2px 0; vertical-align: top;
                      white-space: nowrap; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
table.provenance td { padding: 2px 0; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
                      white-space: pre-wrap; overflow-wrap: anywhere; }
pre.json { background: #f5f7f9; padding: 10px; font-size: 12px; overflow-x: auto; }
"""


def _css() -> str:
    marks = "\n".join(f"table.scores td.{k} {{ {v} }}" for k, v in MARK_STYLES.items())
    truth = "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in TRUTH_COLOUR))
    return CSS.replace("HEADER", HEADER_BACKGROUND).replace("MARKS", marks).replace("TRUTH", truth)


# -- text --------------------------------------------------------------------------------------------

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_NUMBER = re.compile(
    r"[+\-−]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][+\-−]?\d+)?\s*%?"  # 0.512, 1e-05, 1,024, 12 %
    r"(?:\s*[\[(][^\])]*[\])])?"  # an interval: [0.401, 0.622] or (± 0.1)
    r"(?:\s*[≈⚠*†‡]+)*"  # trailing marks
    r"|nan|NaN|inf|-inf|±\s*\S+")
_TRAIL = re.compile(r"\s*[≈⚠†‡]+$")  # marks after a number, aligned in a column of their own
_PLACEHOLDERS = {"", "–", "-", "—", "n/a", "NA", "?"}
_NUM_CLASS = ' class="num"'


def _e(text: Any) -> str:
    """``text`` as HTML-escaped characters (quotes included: safe in attributes)."""
    return html.escape(str(text), quote=True)


def _inline(text: Any) -> str:
    """Escaped text in which Markdown ``**bold**`` and ```code``` become HTML."""
    out = _CODE.sub(r"<code>\1</code>", _e(text))
    return _BOLD.sub(r"<strong>\1</strong>", out)


def _plain(text: Any) -> str:
    """Text without the Markdown marks (for ``alt`` and ``title`` attributes), escaped."""
    return _e(str(text).replace("**", "").replace("`", ""))


def _breakable(name: str) -> str:
    """Escaped ``name`` that may wrap after ``_``, ``-``, ``.`` and ``/`` (long method names)."""
    return re.sub(r"([_\-./])", r"\1<wbr>", _e(name))


def _caption(text: str) -> str:
    """Escaped caption that wraps only between its ``·``-separated parts."""
    return " · ".join(f"<span>{_inline(part)}</span>" for part in str(text).split(" · "))


def _is_number(cell: str) -> bool:
    return _NUMBER.fullmatch(cell.replace("**", "").strip()) is not None


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


def _img(rgb: np.ndarray, alt: str, palette: int | None = None, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return (f'<img{c} src="{png_data_uri(encode_png(rgb, palette))}" width="{rgb.shape[1]}" '
            f'height="{rgb.shape[0]}" alt="{_plain(alt)}">')


def _colourbar(width: int = 120, height: int = 10) -> str:
    from matplotlib import colormaps

    ramp = colormaps[COLORMAP](np.linspace(0, 1, width))[None, :, :3].repeat(height, 0)
    return _img((ramp * 255).round().astype(np.uint8), f"{COLORMAP} colour scale, low to high")


# -- parts of the page -------------------------------------------------------------------------------


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


def render_gallery(gallery: Gallery, anchor: str | None = None) -> str:
    """One row per image: the image, its ground truth (if known), then every method's map.

    Args:
        gallery: The images and maps.
        anchor: ``id`` of the heading.

    Returns:
        HTML: a heading, a legend and a table of ``N`` rows and ``1 + [truth] + methods``
        pictures each.

    Raises:
        ValueError: When the images or a map do not have the documented shapes.
    """
    _check_gallery(gallery)
    n = gallery.images.shape[0]
    grids = [tuple(m.shape[-2:]) for m in gallery.maps.values()]
    if gallery.truth is not None:
        grids.insert(0, tuple(gallery.truth.shape[-2:]))
    image_size = tuple(gallery.images.shape[-2:])
    size = picture_size(grids[0] if grids else None, image_size)
    ident = f' id="{anchor}"' if anchor else ""
    truth_note = (' <span><span class="swatch"></span> ground-truth patches</span>'
                  if gallery.truth is not None else "")
    out = [f"<h3{ident}>{_inline(gallery.title)}</h3>",
           f'<div class="legend">{_colourbar()}<span>brighter = more relevant, scaled per image '
           f"(each map min-max over its patches); one block per patch</span>{truth_note}</div>"]
    if n == 0:
        return "\n".join([*out, '<p class="note">No images.</p>'])
    head = ['<th class="image">image</th>']
    if gallery.truth is not None:
        head.append('<th class="truth">ground truth</th>')
    head += [f'<th title="{_plain(name)}">{_breakable(name)}</th>' for name in gallery.maps]
    out += ['<div class="wrap"><table class="gallery">', "<tr>" + "".join(head) + "</tr>"]
    for i in range(n):
        image = gallery.images[i]
        caption = gallery.captions[i] if i < len(gallery.captions) else ""
        greys: dict[tuple[int, int], np.ndarray] = {}  # the image in grey per picture size
        shown = image_pixels(image, size)
        greys[size] = _grey(shown)
        shown = (shown * 255).round().astype(np.uint8)
        cells = [f'<td class="image">{_img(shown, f"image {i}: {caption}".rstrip(": "))}'
                 + (f'<div class="caption">{_caption(caption)}</div>' if caption else "") + "</td>"]
        if gallery.truth is not None:
            pic = outline(image, gallery.truth[i], picture_size(tuple(gallery.truth.shape[-2:]), image_size))
            cells.append(f'<td class="truth">{_img(pic, f"ground truth {i}", PALETTE)}</td>')
        for name, m in gallery.maps.items():
            at = picture_size(tuple(m.shape[-2:]), image_size)
            if at not in greys:  # maps on another grid than the first
                greys[at] = _grey(image_pixels(image, at))
            pic = _heat(greys[at], m[i])
            cells.append(f'<td class="map">{_img(pic, f"{name} · image {i}", PALETTE)}</td>')
        out.append('<tr class="gallery-row">' + "".join(cells) + "</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _column(rows: list[list[str]], c: int) -> list[str]:
    return [str(r[c]).strip() for r in rows if c < len(r)]


def render_table(table: Table, anchor: str | None = None) -> str:
    """A :class:`Table` as HTML: a heading, the table and its notes.

    Numeric cells (``0.512``, ``0.512 [0.401, 0.622] ≈``, ``1e-05``) are right-aligned, and so
    are placeholders (``–``) in mostly numeric columns and the headers of those columns.

    Args:
        table: The cells, their marks and notes.
        anchor: ``id`` of the heading.

    Raises:
        ValueError: When ``marks`` is not the shape of ``rows`` or holds a class not in
            :data:`MARKS`.
    """
    if table.marks is not None and [len(r) for r in table.marks] != [len(r) for r in table.rows]:
        raise ValueError(f"table {table.title!r}: marks must have the shape of rows")
    for row in table.marks or []:
        for mark in row:
            if mark not in MARKS:
                raise ValueError(f"table {table.title!r}: unknown mark {mark!r}; valid: {MARKS}")
    width = max([len(table.header), *(len(r) for r in table.rows)])
    numeric = []
    for c in range(width):
        cells = _column(table.rows, c)
        filled = [x for x in cells if x not in _PLACEHOLDERS]
        numeric.append(bool(filled) and sum(map(_is_number, filled)) * 2 >= len(filled))
    trailing = [any(_TRAIL.search(x) for x in _column(table.rows, c) if _is_number(x)) for c in range(width)]
    ident = f' id="{anchor}"' if anchor else ""
    head = "".join(f'<th scope="col"{_NUM_CLASS if numeric[c] else ""}>{_inline(h)}</th>'
                   for c, h in enumerate(table.header))
    out = [f"<h3{ident}>{_inline(table.title)}</h3>",
           f'<div class="wrap"><table class="scores" aria-label="{_plain(table.title)}">',
           f"<thead><tr>{head}</tr></thead><tbody>"]
    for r, row in enumerate(table.rows):
        cells = []
        for c, cell in enumerate(row):
            text = str(cell)
            mark = table.marks[r][c] if table.marks is not None else ""
            number = _is_number(text) or (numeric[c] and text.strip() in _PLACEHOLDERS - {""})
            classes = " ".join(k for k in (mark, "num" if number else "") if k)
            cls = f' class="{classes}"' if classes else ""
            if number and trailing[c]:  # the numbers of the column stay aligned, marks or not
                trail = _TRAIL.search(text)
                body = text[:trail.start()] if trail else text
                mark_text = _e(trail.group().strip()) if trail else ""
                cells.append(f'<td{cls}>{_inline(body)}<span class="trail">{mark_text}</span></td>')
            else:
                cells.append(f"<td{cls}>{_inline(text)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    out += [f'<p class="note">{_inline(note)}</p>' for note in table.notes]
    return "\n".join(out)


def _figure(caption: str, image: bytes) -> str:
    return (f'<figure><img src="{data_uri(image)}" alt="{_plain(caption)}">'
            f"<figcaption>{_inline(caption)}</figcaption></figure>")


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``(dotted.key, value)`` pairs, in order; other values are leaves."""
    if isinstance(value, dict) and value:
        return [pair for k, v in value.items() for pair in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, value)]


def _provenance(provenance: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        if not isinstance(v, dict | list | tuple | int | float | bool | None):
            return str(v)  # str, Path, numpy scalars, dtypes...
        return json.dumps(v, default=str, ensure_ascii=False)

    pairs = flatten(provenance) if provenance else []
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(show(v))}</td></tr>" for k, v in pairs)
    dump = json.dumps(provenance, indent=2, default=str, ensure_ascii=False)
    return (f'<section><h2 id="provenance">Provenance</h2><details><summary>Configuration, seeds, '
            f"versions and environment of the run ({len(pairs)} entries)</summary>"
            f'<table class="provenance">{rows}</table>'
            f'<details><summary>as JSON</summary><pre class="json">{_e(dump)}</pre></details>'
            "</details></section>")


def render_report(title: str, sections: list[Section], provenance: dict[str, Any]) -> str:
    """The whole report as one self-contained HTML string.

    Args:
        title: Page title and top heading.
        sections: In order; each gets an entry in the contents (with links to its tables and
            galleries when it has several).
        provenance: Shown at the end, collapsed: every key of the nested dicts with its value,
            and the whole as JSON (values JSON cannot hold are shown as ``str``).

    Returns:
        The HTML page: no script, no external resource.
    """
    anchor = _Anchors()
    toc, body = [], []
    for s in sections:
        a = anchor(s.title)
        parts = [(t.title, anchor(t.title), t) for t in s.tables]
        parts += [(g.title, anchor(g.title), g) for g in s.galleries]
        sub = (' <span class="sub">— ' + " · ".join(f'<a href="#{pa}">{_inline(pt)}</a>'
                                                      for pt, pa, _ in parts) + "</span>"
               if len(parts) > 1 else "")
        toc.append(f'<li><a href="#{a}">{_inline(s.title)}</a>{sub}</li>')
        body.append(f'<section><h2 id="{a}">{_inline(s.title)}</h2>')
        body += [f"<p>{_inline(t)}</p>" for t in s.text]
        body += [render_table(t, pa) for _, pa, t in parts if isinstance(t, Table)]
        body += [_figure(caption, png) for caption, png in s.figures]
        body += [render_gallery(g, pa) for _, pa, g in parts if isinstance(g, Gallery)]
        body.append("</section>")
    toc.append('<li><a href="#provenance">Provenance</a></li>')
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_plain(title)}</title>\n<style>{_css()}</style></head><body>\n"
            f"<h1>{_inline(title)}</h1>\n"
            f'<nav class="toc" id="contents"><strong>Contents</strong><ol>{"".join(toc)}</ol></nav>\n'
            + "\n".join(body) + "\n" + _provenance(provenance) + "\n</body></html>\n")


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
