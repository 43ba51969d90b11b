"""report.html: escaping, a self-contained page, the gallery's pictures, table marks, and what a
real browser (headless Chromium) draws from it."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import stat
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchbench.bench.report import (
    CELL_PIXELS,
    HEADER_BACKGROUND,
    Gallery,
    Section,
    Table,
    render_report,
    write_report,
)
from patchbench.bench.tables import Cell

EVIL = "<script>alert(1)</script>"
VOID = {"img", "meta", "br", "hr", "input", "link", "wbr", "col", "source"}


# -- a small DOM over html.parser ----------------------------------------------------------------------


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None = None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, tag: str, cls: str | None = None) -> list[Node]:
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if c.tag == tag and (cls is None or cls in c.classes):
                    out.append(c)
                out += c.find(tag, cls)
        return out


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#root", {})

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_endtag(self, tag):
        node = self.node
        while node is not self.root and node.tag != tag:
            node = node.parent
        assert node is not self.root, f"</{tag}> closes nothing"
        self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def parse(page: str) -> Node:
    parser = _Parser()
    parser.feed(page)
    parser.close()
    assert parser.node is parser.root, f"<{parser.node.tag}> never closed"
    return parser.root


def decode(img: Node) -> Image.Image:
    src = img.attrs["src"]
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    data = base64.b64decode(src[len(prefix):], validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    picture = Image.open(io.BytesIO(data))
    picture.load()
    assert picture.format == "PNG"
    return picture


def gallery_rows(page: str) -> list[Node]:
    return [tr for table in parse(page).find("table", "gallery") for tr in table.find("tr", "gallery-row")]


# -- inputs --------------------------------------------------------------------------------------------


def _gallery(n=3, methods=("a", "b", "c"), size=(16, 16), grid=(4, 4), truth=True, seed=0) -> Gallery:
    g = torch.Generator().manual_seed(seed)
    return Gallery(
        title="toy", images=torch.rand(n, 3, *size, generator=g),
        maps={m: torch.randn(n, *grid, generator=g) for m in methods},
        truth=torch.rand(n, *grid, generator=g) > 0.5 if truth else None,
        captions=[f"label {i} · pred {i}" for i in range(n)])


def _report(*sections: Section, provenance=None) -> str:
    return render_report("run", list(sections), provenance or {"seed": 0})


def _block_means(picture: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """``[Hp, Wp]`` mean luminance of each patch's block."""
    grey = np.asarray(picture.convert("L"), dtype=float)
    (h, w), (hp, wp) = grey.shape, grid
    assert h % hp == 0 and w % wp == 0, "a whole number of pixels per patch"
    return grey.reshape(hp, h // hp, wp, w // wp).mean(axis=(1, 3))


# -- escaping and self-containment ---------------------------------------------------------------------


def test_user_text_is_escaped_everywhere():
    gallery = _gallery(n=2, methods=(EVIL, 'q" onerror="alert(2)'))
    gallery.captions = [EVIL, "x"]
    gallery.title = EVIL
    table = Table(EVIL, ["method", EVIL], [[EVIL, Cell(0.5, ".1f", mark="best")],
                                           ["x", Cell(EVIL, mark="fail")]], [EVIL])
    page = render_report(EVIL, [Section(EVIL, [EVIL], [table], [(EVIL, _png(4, 4))], [gallery])],
                         {EVIL: {"nested": EVIL}})
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    root = parse(page)
    for node in [*root.find("img"), *root.find("th"), *root.find("td")]:
        assert not any(k.startswith("on") for k in node.attrs), node.attrs
    # the names survive, as text
    heads = [th.text() for th in root.find("table", "gallery")[0].find("th")]
    assert heads[-2:] == [EVIL, 'q" onerror="alert(2)']
    assert [img.attrs["alt"] for img in root.find("img") if img.attrs["alt"].startswith("q")] == [
        'q" onerror="alert(2) · image 0', 'q" onerror="alert(2) · image 1']


def _png(h: int, w: int, colour=(255, 0, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("size, grid, expected", [
    ((16, 16), (4, 4), (96, 96)),  # 24 pixels per patch
    ((32, 32), (8, 8), (96, 96)),
    ((224, 224), (14, 14), (98, 98)),  # reduced: 7 pixels per patch
    ((12, 20), (3, 5), (57, 95)),  # not square: 19 pixels per patch
])
def test_page_is_self_contained_and_pictures_decode(size, grid, expected):
    gallery = _gallery(size=size, grid=grid)
    figure = ("curves", _png(30, 50))
    page = _report(Section("Gallery", ["text"], [Table("t", ["a"], [["1"]])], [figure], [gallery]))
    low = page.lower()
    for needle in ('src="http', "href=\"http", "src='http", "url(", "@import", "<script", "<link", "//cdn"):
        assert needle not in low, needle
    root = parse(page)
    imgs = root.find("img")
    assert imgs and all(img.attrs["src"].startswith("data:image/png;base64,") for img in imgs)
    for img in imgs:
        picture = decode(img)
        if "width" in img.attrs:
            assert picture.size == (int(img.attrs["width"]), int(img.attrs["height"]))
    figures = [decode(f.find("img")[0]) for f in root.find("figure")]
    assert [p.size for p in figures] == [(50, 30)]
    cells = [decode(img).size for tr in gallery_rows(page) for img in tr.find("img")]
    assert len(cells) == 3 * (1 + 1 + 3) and set(cells) == {(expected[1], expected[0])}
    # every link is an anchor of the page
    ids = {n.attrs["id"] for n in _walk(root) if "id" in n.attrs}
    hrefs = [a.attrs["href"] for a in root.find("a")]
    assert hrefs and all(h.startswith("#") and h[1:] in ids for h in hrefs)


def _walk(node: Node):
    for c in node.children:
        if isinstance(c, Node):
            yield c
            yield from _walk(c)


def test_contents_lists_every_section_and_provenance_is_collapsed():
    boards = [Table("glyphs", ["m"], [["x"]]), Table("glyphs", ["m"], [["y"]])]
    sections = [Section("Summary", ["hello"]), Section("Leaderboards", tables=boards),
                Section("Summary", ["twice the same title"])]
    provenance = {"config": {"model": "pb-vit-tiny", "seeds": [0, 1]}, "path": Path("/x"), "empty": {}}
    root = parse(render_report("r", sections, provenance))
    toc = root.find("nav", "toc")[0]
    top = [li.find("a")[0] for li in toc.find("li")]
    assert [a.text() for a in top] == ["Summary", "Leaderboards", "Summary", "Provenance"]
    targets = [a.attrs["href"][1:] for a in toc.find("a")]
    assert len(set(targets)) == len(targets) == 6  # both tables linked; no id given twice
    ids = [n.attrs["id"] for n in _walk(root) if "id" in n.attrs]
    assert len(ids) == len(set(ids)) and set(targets) <= set(ids)
    details = root.find("details")[0]
    assert "open" not in details.attrs
    rows = {tr.find("th")[0].text(): tr.find("td")[0].text() for tr in details.find("table", "provenance")[0]
            .find("tr")}
    assert rows == {"config.model": "pb-vit-tiny", "config.seeds": "[0, 1]", "path": "/x", "empty": "{}"}
    assert '"seeds": [' in details.find("pre")[0].text()


# -- the gallery ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("truth", [True, False])
def test_gallery_has_one_row_per_image_and_one_picture_per_column(truth):
    methods = ("random", "attention", "rollout", "gradcam")
    page = _report(Section("Gallery", galleries=[_gallery(n=5, methods=methods, truth=truth)]))
    table = parse(page).find("table", "gallery")[0]
    heads = [th.text() for th in table.find("th")]
    assert heads == ["image", *(["ground truth"] if truth else []), *methods]
    rows = gallery_rows(page)
    assert len(rows) == 5
    assert [len(tr.find("td")) for tr in rows] == [len(heads)] * 5
    assert [len(tr.find("img")) for tr in rows] == [len(heads)] * 5
    assert [tr.find("div", "caption")[0].text() for tr in rows] == [f"label {i} · pred {i}" for i in range(5)]
    assert "brighter = more relevant, scaled per image" in page


@pytest.mark.parametrize("size, grid, hot", [
    ((16, 16), (4, 4), (0, 3)),
    ((16, 16), (4, 4), (2, 1)),
    ((224, 224), (14, 14), (9, 4)),
    ((12, 20), (3, 5), (2, 4)),  # rows and columns not swapped
])
def test_a_single_hot_patch_is_the_brightest_block_at_its_place(size, grid, hot):
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))  # a noisy underlay
    maps = torch.full((1, *grid), -3.0)
    maps[0, hot[0], hot[1]] = 5.0
    page = _report(Section("g", galleries=[Gallery("g", images, {"m": maps})]))
    (row,) = gallery_rows(page)
    picture = decode(row.find("td", "map")[0].find("img")[0])
    means = _block_means(picture, grid)
    assert np.unravel_index(means.argmax(), grid) == hot
    others = np.delete(means.ravel(), np.ravel_multi_index(hot, grid))
    assert means[hot] > others.max() + 100  # not a close call: inferno's top against its bottom


def test_scaling_is_per_image_and_a_constant_map_is_uniform():
    images = torch.full((2, 3, 16, 16), 0.5)
    small = torch.zeros(2, 4, 4)
    small[0, 1, 1] = 1e-6  # tiny values still use the whole colour scale
    small[1] = 7.0  # constant
    page = _report(Section("g", galleries=[Gallery("g", images, {"m": small})]))
    first, second = (_block_means(decode(tr.find("td", "map")[0].find("img")[0]), (4, 4))
                     for tr in gallery_rows(page))
    assert first[1, 1] - np.delete(first.ravel(), 5).max() > 100
    pixels = np.asarray(decode(gallery_rows(page)[1].find("td", "map")[0].find("img")[0]).convert("RGB"))
    assert np.ptp(second) == 0 and (pixels == pixels[0, 0]).all()


def test_ground_truth_patches_are_tinted_green_in_place():
    images = torch.full((1, 3, 12, 20), 0.5)
    truth = torch.zeros(1, 3, 5, dtype=torch.bool)
    truth[0, 0, 4] = truth[0, 2, 0] = True
    page = _report(Section("g", galleries=[Gallery("g", images, {"m": torch.rand(1, 3, 5)}, truth)]))
    picture = decode(gallery_rows(page)[0].find("td", "truth")[0].find("img")[0]).convert("RGB")
    rgb = np.asarray(picture, dtype=float)
    h, w = rgb.shape[0] // 3, rgb.shape[1] // 5
    means = rgb.reshape(3, h, 5, w, 3).mean(axis=(1, 3))
    green = means[..., 1] - means[..., 0]
    assert set(zip(*np.nonzero(green > 40))) == {(0, 4), (2, 0)}


def test_non_finite_maps_and_bad_shapes():
    maps = torch.rand(2, 4, 4)
    maps[0, 0, 0] = float("nan")
    maps[1] = float("inf")
    page = _report(Section("g", galleries=[Gallery("g", torch.rand(2, 3, 16, 16), {"m": maps})]))
    assert len(gallery_rows(page)) == 2
    with pytest.raises(ValueError, match="'m'.*expected \\[2, Hp, Wp\\]"):
        _report(Section("g", galleries=[Gallery("g", torch.rand(2, 3, 16, 16), {"m": torch.rand(3, 4, 4)})]))
    with pytest.raises(ValueError, match="ground truth"):
        _report(Section("g", galleries=[Gallery("g", torch.rand(2, 3, 16, 16), {}, torch.ones(2, 4))]))


# -- tables --------------------------------------------------------------------------------------------


def test_marks_become_classes_on_their_cells():
    rows = [["attention", Cell(0.5123, ".3f", 0.401, 0.622, "best"), Cell(0.2, ".2f"), "ok"],
            ["rollout", Cell(0.498, ".3f", 0.38, 0.61, "tie", "≈"), Cell(0.31, ".2f"),
             Cell("pass", mark="pass")],
            ["random", Cell(0.101, ".3f", 0.05, 0.15, "worse"), Cell(None, ".2f"), Cell("flag", mark="flag")],
            ["broken", Cell("failed: out of memory", mark="fail"), "", ""]]
    marks = [["", "best", "", ""], ["", "tie", "", "pass"], ["", "worse", "", "flag"], ["", "fail", "", ""]]
    page = _report(Section("s", tables=[Table("board `mean`", ["method", "SRG ↑", "ms", "check"], rows,
                                              ["note with `code`"])]))
    table = parse(page).find("table", "scores")[0]
    cells = [tr.find("td") for tr in table.find("tr")[1:]]
    got = [[c.classes - {"num"} for c in row] for row in cells]
    assert got == [[{m} if m else set() for m in row] for row in marks]
    numeric = [["num" in c.classes for c in row] for row in cells]
    assert numeric == [[False, True, True, False], [False, True, True, False],
                       [False, True, True, False], [False, False, False, False]]
    assert ["num" in th.classes for th in table.find("th")] == [False, True, True, False]
    best = cells[0][1]
    assert best.find("strong")[0].text() == "0.512" and best.text() == "0.512 [0.401, 0.622]"
    assert cells[1][1].text() == "0.498 [0.380, 0.610]≈"  # the mark in its own aligned span
    assert cells[2][2].text() == "–"  # a missing number
    assert "<code>mean</code>" in page and "<code>code</code>" in page


def test_a_column_is_numeric_by_its_cells_not_by_its_text():
    """Numbers written as text stay text; a failure text does not make a score column textual."""
    table = Table("t", ["a", "b", "c"], [["1.5", Cell(2.0, ".1f"), Cell("n/a")],
                                         ["2.5", Cell("failed: x", mark="fail"), Cell("n/a")],
                                         ["3.5", Cell(4.0, ".1f"), Cell(None)]])
    assert table.numeric == [False, True, False]
    scores = parse(_report(Section("s", tables=[table]))).find("table", "scores")[0]
    head = [th.classes for th in scores.find("th")]
    assert head == [set(), {"num"}, set()]


def test_bad_marks_are_refused():
    with pytest.raises(ValueError, match="unknown mark 'gold'"):
        Cell("1", mark="gold")


# -- writing -------------------------------------------------------------------------------------------


def test_write_report_replaces_the_file_whole(tmp_path):
    path = tmp_path / "report.html"
    sections = [Section("Gallery", galleries=[_gallery()])]
    write_report(path, "run", sections, {"seed": 0})
    assert path.read_text(encoding="utf-8") == render_report("run", sections, {"seed": 0})
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044  # readable by others, like the run's files
    before = path.read_text(encoding="utf-8")
    broken = Gallery("g", torch.rand(2, 3, 16, 16), {"m": torch.rand(3, 4, 4)})  # 3 maps for 2 images
    with pytest.raises(ValueError):
        write_report(path, "run", [Section("s", tables=[Table("t", ["a"], [["1"]])], galleries=[broken])], {})
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def test_report_stays_small():
    """Two datasets of 8 photo-sized images and 12 methods: well under 5 MB."""
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(8, 3, 28, 28, generator=g), size=(224, 224),
                                             mode="bilinear")
    images = (smooth + 0.15 * torch.rand(8, 3, 224, 224, generator=g)).clamp(0, 1)
    maps = {f"method_{k}": torch.rand(8, 14, 14, generator=g) for k in range(12)}
    galleries = [Gallery(f"d{d}", images, maps, torch.rand(8, 14, 14, generator=g) > 0.7) for d in range(2)]
    page = _report(Section("Gallery", galleries=galleries))
    assert len(gallery_rows(page)) == 16
    assert len(page.encode()) < 3_000_000


# -- a real browser ------------------------------------------------------------------------------------

MAGENTA = (255, 0, 255)


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is needed for the report's screenshot test: apt-get install chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return exe


def _screenshot(exe: str, page: Path, out: Path, profile: Path) -> np.ndarray:
    command = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--force-color-profile=srgb", "--force-device-scale-factor=1",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               f"--user-data-dir={profile}", "--window-size=1280,2000", f"--screenshot={out}", page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and out.exists(), done.stderr[-2000:]
    shot = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert shot.shape == (2000, 1280, 3)
    return shot


def _colour_mask(shot: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 4) -> np.ndarray:
    return (np.abs(shot - np.array(rgb)) <= tolerance).all(axis=-1)


def _solid_block(mask: np.ndarray) -> tuple[int, int, float] | None:
    """Height, width and fill of the box around the mask's pixels, or None without any."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    return int(h), int(w), float(len(ys) / (h * w))


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))


def test_chromium_draws_the_gallery_and_the_table(tmp_path):
    from patchbench.bench.report import MARK_STYLES

    exe = _chromium()
    best = _hex(re.search(r"#[0-9a-f]{6}", MARK_STYLES["best"]).group())
    images = torch.zeros(1, 3, 16, 16)
    images[0, 0] = images[0, 2] = 1.0  # magenta
    maps = {"a": torch.rand(1, 4, 4), "b": torch.rand(1, 4, 4)}
    truth = torch.zeros(1, 4, 4, dtype=torch.bool)
    truth[0, 1:3, 1:3] = True
    def sections(marked):
        rows = [["attention", Cell(0.9, ".3f", 0.8, 1.0, "best" if marked else ""), 12],
                ["random", Cell(0.1, ".3f", 0.0, 0.2, "worse" if marked else ""), 3]]
        return [Section("Scores", tables=[Table("board", ["method", "SRG ↑", "n"], rows, [])]),
                Section("Gallery", galleries=[Gallery("magenta", images, maps, truth, ["one"])])]

    good = render_report("check", sections(True), {})
    src = re.search(r'<td class="image"><img src="(data:image/png;base64,[^"]+)"', good).group(1)
    bad = render_report("check", sections(False), {}).replace(src, "data:image/png;base64,iVBORw0KGgoAAAAA")
    assert src not in bad

    shots = {}
    for name, page in (("good", good), ("bad", bad)):
        (tmp_path / f"{name}.html").write_text(page, encoding="utf-8")
        shots[name] = _screenshot(exe, tmp_path / f"{name}.html", tmp_path / f"{name}.png",
                                  tmp_path / f"profile-{name}")

    # (a) the image: one solid magenta block, CELL_PIXELS on a side
    block = _solid_block(_colour_mask(shots["good"], MAGENTA, 8))
    assert block is not None, "no magenta pixels: the gallery's image was not drawn"
    h, w, fill = block
    assert abs(h - CELL_PIXELS) <= 2 and abs(w - CELL_PIXELS) <= 2 and fill > 0.97, block
    # (b) the table: its header and its best cell have their backgrounds
    assert _colour_mask(shots["good"], _hex(HEADER_BACKGROUND)).sum() > 500
    assert _colour_mask(shots["good"], best).sum() > 500
    # (c) the same checks on the broken page find nothing
    assert _solid_block(_colour_mask(shots["bad"], MAGENTA, 8)) is None
    assert _colour_mask(shots["bad"], best).sum() < 20
    assert _colour_mask(shots["bad"], _hex(HEADER_BACKGROUND)).sum() > 500  # the page itself was drawn
