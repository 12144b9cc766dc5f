"""Pictures of results, written by hand: PNG images, label overlays, montages, SVG charts.

    png_bytes(overlay(grey(slice_), labels).round().to(torch.uint8))    # an RGB PNG
    chart = Chart("validation IoU, phantom", "epoch", "IoU")
    chart.line([0, 1, 2], [0.2, 0.5, 0.6], "BYOL ACDC", band=([...], [...]))
    write_svg("curves.svg", [chart])                                   # opens in any browser
    write_svg("x.svg", [Tiles(rows, title="x", captions=["ED", "ES"], columns=["slice 1 of 9", ...])])
    write_svg("x_slices.svg", [slice_tiles("x.nii.gz", [("ED", image, labels), ...])])
    draw_curves("runs/seg", "fine-tuning", [("loss", "training loss")])  # RUN/curves.svg from RUN/log.jsonl

Everything is written by hand (zlib for PNG, text for SVG): no imaging or plotting library.
"""
import base64
import html
import math
import os
import struct
import zlib

import torch
import torch.nn.functional as F

import files

# background, RV, MYO, LV: the colours of every overlay and legend
COLOURS = torch.tensor([[0, 0, 0], [230, 60, 60], [60, 210, 60], [60, 120, 255]], dtype=torch.float32)
LEGEND = [("RV", "#e63c3c"), ("MYO", "#3cd23c"), ("LV", "#3c78ff")]
# line colours of the charts, one per series (a colour-blind-safe qualitative palette)
PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000"]


# -----------------------------------------------------------------------------
# PNG

def png_bytes(image):
    """(3, H, W) uint8 tensor -> the bytes of an RGB PNG (filter 0 on every row, one zlib stream)"""
    h, w = image.shape[1:]
    rows = torch.cat([torch.zeros(h, 1, dtype=torch.uint8), image.permute(1, 2, 0).reshape(h, 3 * w)], 1)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">2I5B", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes())) + chunk(b"IEND", b""))


def grey(image, low=0.01, high=0.99):
    """intensities -> float 0..255, windowed at the `low` and `high` quantiles of `image` (a slice
    or the whole volume, so that the slices of one volume share a window)"""
    image = image.float()
    sample = image.flatten()[:: max(1, image.numel() // 1_000_000)]  # quantile has a size limit
    lo, hi = torch.quantile(sample, torch.tensor([low, high]))
    return ((image - lo) / (hi - lo).clamp(min=1e-6) * 255).clamp(0, 255)


def overlay(gray, labels, alpha=0.45):
    """(H, W) 0..255 grey, (H, W) labels -> (3, H, W) colours blended over the structures"""
    rgb = gray.expand(3, -1, -1)
    colour = COLOURS.to(labels.device)[labels.long()].permute(2, 0, 1)  # (3, H, W)
    return torch.where(labels > 0, (1 - alpha) * rgb + alpha * colour, rgb)


def pick_slices(labels, count=3):
    """basal, mid and apical slices of an (X, Y, Z) label volume: evenly spaced among the slices that
    hold a structure (all slices when none does)"""
    z = (labels.flatten(0, 1) > 0).any(0).nonzero().flatten().tolist() or list(range(labels.shape[2]))
    return sorted({z[round(i * (len(z) - 1) / max(1, count - 1))] for i in range(count)})


def square(tile, side):
    """(3, H, W) -> (3, side, side): padded to a square with black, then resized (nearest)"""
    s = max(tile.shape[1:])
    tile = F.pad(tile, (0, s - tile.shape[2], 0, s - tile.shape[1]))
    return F.interpolate(tile[None], size=(side, side), mode="nearest")[0]


# -----------------------------------------------------------------------------
# SVG: charts with axes, ticks, labels, a legend and bands; picture tiles with text

def esc(text):
    return html.escape(str(text), quote=True)


def nice_ticks(lo, hi, count=5, integer=False):
    """about `count` round values (1, 2 or 5 x 10^k apart; whole numbers if integer) covering [lo, hi]"""
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    step = max(step, 1) if integer else step
    first = math.floor(lo / step) * step
    return [round(first + i * step, 10) for i in range(int(math.ceil((hi - first) / step)) + 1)]


def log_ticks(lo, hi):
    """1, 2, 5 x 10^k within [lo, hi] (only powers of ten when the range spans more than 2 decades)"""
    ms = (1,) if math.log10(hi / lo) > 2 else (1, 2, 5)
    return [m * 10 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
            for m in ms if lo * (1 - 1e-9) <= m * 10 ** k <= hi * (1 + 1e-9)]


def label(v):
    return f"{v:g}"


class Chart:
    """one panel: line series (optionally a band, e.g. +- std), vertical markers, axes, legend"""

    def __init__(self, title, xlabel, ylabel, xlog=False, plot_width=400, height=340, integer_x=False):
        self.title, self.xlabel, self.ylabel, self.xlog = title, xlabel, ylabel, xlog
        self.integer_x = integer_x  # ticks on whole numbers only (epochs)
        self.plot_width, self.height = plot_width, height
        self.series, self.marks = [], []

    def _margins(self):  # the legend sits on the right, as wide as the longest name
        longest = max([len(s["name"]) for s in self.series] or [0])
        return dict(l=62, r=44 + 7 * longest if self.series else 20, t=34, b=46)

    @property
    def width(self):
        m = self._margins()
        return m["l"] + self.plot_width + m["r"]

    def line(self, x, y, name, band=None, colour=None, dashed=False):
        """x, y: numbers (nan: a gap); band: (low, high) lists beside y"""
        colour = colour or PALETTE[len(self.series) % len(PALETTE)]
        self.series.append(dict(x=list(x), y=list(y), name=name, band=band, colour=colour, dashed=dashed))
        return self

    def mark(self, x, name, colour="#555555"):
        """a vertical dashed line at x, labelled"""
        self.marks.append((x, name, colour))
        return self

    def _points(self):
        pts = [(x, v) for s in self.series for i, x in enumerate(s["x"])
               for v in [s["y"][i], *(s["band"][j][i] for j in (0, 1) if s["band"])]]
        return [(x, y) for x, y in pts if finite(x) and finite(y) and (x > 0 or not self.xlog)]

    def svg(self, left=0, top=0):
        """-> an SVG group drawing the chart with its top-left corner at (left, top)"""
        pts = self._points() + [(x, None) for x, _, _ in self.marks]
        xs = [x for x, _ in pts] or [1.0]
        ys = [y for _, y in pts if y is not None] or [0.0]
        m = self._margins()
        pw, ph = self.plot_width, self.height - m["t"] - m["b"]
        if self.xlog:
            xt = log_ticks(min(xs), max(xs)) or [min(xs)]
            x0, x1 = math.log10(min(xs + xt)), math.log10(max(xs + xt))
            fx = lambda v: math.log10(v)  # noqa: E731
        else:
            xt = nice_ticks(min(xs), max(xs), integer=self.integer_x)
            x0, x1, fx = xt[0], xt[-1], float
        yt = nice_ticks(min(ys), max(ys))
        y0, y1 = yt[0], yt[-1]
        px = lambda v: left + m["l"] + (fx(v) - x0) / ((x1 - x0) or 1) * pw  # noqa: E731
        py = lambda v: top + m["t"] + ph - (v - y0) / ((y1 - y0) or 1) * ph  # noqa: E731
        out = [f'<text x="{left + self.width / 2:.1f}" y="{top + 20}" text-anchor="middle" '
               f'font-size="14" font-weight="bold">{esc(self.title)}</text>',
               f'<rect x="{left + m["l"]}" y="{top + m["t"]}" width="{pw}" height="{ph}" '
               f'fill="none" stroke="#888"/>']
        for v in xt:
            if x0 - 1e-9 <= fx(v) <= x1 + 1e-9:
                out += [f'<line x1="{px(v):.1f}" x2="{px(v):.1f}" y1="{top + m["t"]}" '
                        f'y2="{top + m["t"] + ph}" stroke="#e4e4e4"/>',
                        f'<text x="{px(v):.1f}" y="{top + m["t"] + ph + 16}" text-anchor="middle" '
                        f'font-size="11">{label(v)}</text>']
        for v in yt:
            out += [f'<line x1="{left + m["l"]}" x2="{left + m["l"] + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                    f'stroke="#e4e4e4"/>',
                    f'<text x="{left + m["l"] - 6}" y="{py(v) + 4:.1f}" text-anchor="end" font-size="11">'
                    f'{label(v)}</text>']
        out += [f'<text x="{left + m["l"] + pw / 2:.1f}" y="{top + self.height - 10}" text-anchor="middle" '
                f'font-size="12">{esc(self.xlabel)}{" (log scale)" if self.xlog else ""}</text>',
                f'<text transform="translate({left + 16},{top + m["t"] + ph / 2:.1f}) rotate(-90)" '
                f'text-anchor="middle" font-size="12">{esc(self.ylabel)}</text>']
        for x, name, colour in self.marks:
            out += [f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top + m["t"]}" y2="{top + m["t"] + ph}" '
                    f'stroke="{colour}" stroke-dasharray="4 3"/>',
                    f'<text x="{px(x) + 3:.1f}" y="{top + m["t"] + 12}" font-size="11" fill="{colour}">'
                    f'{esc(name)}</text>']
        for i, s in enumerate(self.series):
            keep = [j for j, x in enumerate(s["x"])
                    if finite(x) and finite(s["y"][j]) and (x > 0 or not self.xlog)]
            if s["band"] and keep:
                lo, hi = s["band"]
                ring = [(px(s["x"][j]), py(hi[j])) for j in keep if finite(hi[j])]
                ring += [(px(s["x"][j]), py(lo[j])) for j in reversed(keep) if finite(lo[j])]
                out.append(f'<polygon points="{path_of(ring)}" fill="{s["colour"]}" fill-opacity="0.18" '
                           f'stroke="none"><title>{esc(s["name"])} band</title></polygon>')
            dash = ' stroke-dasharray="6 3"' if s["dashed"] else ""
            line = [(px(s["x"][j]), py(s["y"][j])) for j in keep]
            out.append(f'<polyline class="series" data-name="{esc(s["name"])}" points="{path_of(line)}" '
                       f'fill="none" stroke="{s["colour"]}" stroke-width="2"{dash}/>')
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{s["colour"]}"/>' for a, b in line]
            ly = top + m["t"] + 8 + 18 * i  # the legend entry
            lx = left + self.width - m["r"] + 12
            out += [f'<line x1="{lx}" x2="{lx + 18}" y1="{ly}" y2="{ly}" stroke="{s["colour"]}" '
                    f'stroke-width="3"{dash}/>',
                    f'<text x="{lx + 24}" y="{ly + 4}" font-size="11">{esc(s["name"])}</text>']
        return "<g>" + "\n".join(out) + "</g>"


class Tiles:
    """rows of picture tiles ((3, H, W) uint8 tensors, embedded as PNG) with a caption per row, a
    label per column, a title, a subtitle and a colour legend, so a picture explains itself without
    any font code"""

    def __init__(self, rows, title="", legend=LEGEND, captions=None, tile=160, gap=4, columns=(), subtitle=""):
        self.rows, self.title, self.legend, self.tile, self.gap = rows, title, legend, tile, gap
        self.captions, self.columns, self.subtitle = captions or [""] * len(rows), columns, subtitle
        # as wide as the tiles, or as the text (about 7 pixels a character at 12 px, 8.5 for the title)
        text = max([8.5 * len(title), 7 * len(subtitle)] + [7 * len(c) for c in self.captions])
        self.width = round(max(max(len(r) for r in rows) * (tile + gap), text)) + 12
        self.head = 48 + 18 * bool(subtitle) + 18 * bool(columns)  # title, subtitle, legend, column labels
        self.height = self.head + len(rows) * (tile + 22) + 10

    def svg(self, left=0, top=0):
        out = [f'<text x="{left + 6}" y="{top + 18}" font-size="14" font-weight="bold">'
               f'{esc(self.title)}</text>']
        if self.subtitle:
            out.append(f'<text x="{left + 6}" y="{top + 36}" font-size="12">{esc(self.subtitle)}</text>')
        x, y = left + 6, top + 28 + 18 * bool(self.subtitle)
        for name, colour in self.legend:
            out += [f'<rect x="{x}" y="{y}" width="12" height="12" fill="{colour}"/>',
                    f'<text x="{x + 16}" y="{y + 11}" font-size="12">{esc(name)}</text>']
            x += 24 + 8 * len(name)
        for i, name in enumerate(self.columns):  # centred above the tiles of their column
            out.append(f'<text x="{left + 6 + i * (self.tile + self.gap) + self.tile / 2:.1f}" y="{y + 32}" '
                       f'text-anchor="middle" font-size="12">{esc(name)}</text>')
        y = top + self.head
        for tiles, caption in zip(self.rows, self.captions):
            out.append(f'<text x="{left + 6}" y="{y + 14}" font-size="12">{esc(caption)}</text>')
            for i, tile in enumerate(tiles):
                data = base64.b64encode(png_bytes(square(tile.float(), self.tile).round().to(torch.uint8)))
                out.append(f'<image x="{left + 6 + i * (self.tile + self.gap)}" y="{y + 20}" '
                           f'width="{self.tile}" height="{self.tile}" '
                           f'href="data:image/png;base64,{data.decode()}"/>')
            y += self.tile + 22
        return "<g>" + "\n".join(out) + "</g>"


def slice_tiles(title, rows, subtitle=""):
    """rows of (caption, image, labels), (X, Y, Z) each -> Tiles: basal, mid and apical slices (where the
    first row's labels hold a structure), each image beside the prediction over it, columns named"""
    picked, depth = pick_slices(rows[0][2]), rows[0][2].shape[2]
    tiles = []
    for _, image, labels in rows:
        gray = grey(image)  # one window for the whole volume
        tiles.append([t for z in picked for t in (gray[:, :, z].expand(3, -1, -1),
                                                   overlay(gray[:, :, z], labels[:, :, z]))])
    columns = [name for z in picked for name in (f"slice {z + 1} of {depth}", "prediction")]
    return Tiles(tiles, title, captions=[row[0] for row in rows], columns=columns, subtitle=subtitle)


def finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def percent(v):
    """a percentage as text, "12.3 %", or "n/a" when it is missing (None, nan)"""
    return f"{v:.1f} %" if finite(v) else "n/a"


def path_of(points):
    return " ".join(f"{x:.1f},{y:.1f}" for x, y in points)


def svg_text(panels, columns=2):
    """panels (Chart or Tiles) on a grid -> a standalone SVG document"""
    columns = max(1, min(columns, len(panels)))
    widths = [max(p.width for p in panels[c::columns]) for c in range(columns)]
    rows = [panels[i:i + columns] for i in range(0, len(panels), columns)]
    heights = [max(p.height for p in row) for row in rows]
    body, top = [], 0
    for row, h in zip(rows, heights):
        left = 0
        for c, panel in enumerate(row):
            body.append(panel.svg(left, top))
            left += widths[c]
        top += h
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{sum(widths)}" height="{top}" '
            f'viewBox="0 0 {sum(widths)} {top}" font-family="sans-serif">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def write_svg(path, panels, columns=2):
    files.write_text(path, svg_text(panels, columns))


def draw_curves(out, title, panels):
    """a run folder's curves.svg from its log.jsonl, refreshed each epoch: panels is [(key, axis label)]
    of per-epoch values, one chart each, over epochs counted from 1"""
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return
    epochs = [r for r in files.read_jsonl(path) if "steps" in r]  # one line per epoch
    charts = []
    for key, label in panels:
        points = [(r["epoch"] + 1, r[key]) for r in epochs if r.get(key) is not None]  # epoch k: the k-th
        if points:
            chart = Chart(f"{label}, {title}", "epoch", label, integer_x=True)
            charts.append(chart.line([e for e, _ in points], [v for _, v in points], label))
    if charts:
        write_svg(os.path.join(out, "curves.svg"), charts, columns=len(charts))
