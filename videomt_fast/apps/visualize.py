"""Pictures a person can read: label colours, outlines, a small bitmap font, overlays with a legend.

numpy only. :func:`colours` gives the label palette (id 0 black) shared by the palette PNGs and the
overlays, so an id has one colour everywhere; :func:`ranked_palette` gives a video's few tracks the
first, most separated colours whatever their ids. :func:`draw_overlay` tints each labelled region of a
frame, outlines it, writes its id on it (labels that would overlap are moved apart) and lists a legend
(colour swatch and text per id) in the corner it covers least of the objects (:func:`legend_corner`).
Text uses a built-in 5x7 font (upper-case letters, digits, common punctuation; lower case is drawn in
upper case), scaled by whole pixels to the frame size.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

# 5x7 glyphs: seven rows of five bits each (bit 4 = leftmost column)
_GLYPHS = {
    " ": (0, 0, 0, 0, 0, 0, 0),
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11), "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E), "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F), "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F), "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E), "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11), "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11), "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D), "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E), "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A), "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04), "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    ".": (0, 0, 0, 0, 0, 0x0C, 0x0C), ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08), ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0),
    "-": (0, 0, 0, 0x1F, 0, 0, 0), "_": (0, 0, 0, 0, 0, 0, 0x1F), "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0),
    "=": (0, 0, 0x1F, 0, 0x1F, 0, 0), "#": (0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02), ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "/": (0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10), "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04),
}
GLYPH_W, GLYPH_H = 5, 7
_BITMAPS = {
    ch: np.array([[(row >> (4 - c)) & 1 for c in range(GLYPH_W)] for row in rows], bool) for ch, rows in _GLYPHS.items()
}


def colours(n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 label colours: 0 is black (nothing), then bright, well separated hues
    (golden-ratio hue steps, alternating saturation and value)."""
    out = np.zeros((max(n, 1), 3), np.uint8)
    for i in range(1, n):
        hue = (i * 0.618033988749895 + 0.08) % 1.0
        sat = (0.95, 0.7, 0.85)[i % 3]
        val = (1.0, 0.9, 0.8)[(i // 3) % 3]
        rgb = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
        out[i] = np.round(255 * val * (1 - sat + sat * rgb))
    return out


def ranked_palette(ids_best_first, size: int = 256) -> np.ndarray:
    """``(max(size, max id + 1), 3)`` uint8: the k-th id of ``ids_best_first`` gets the k-th colour of
    :func:`colours`, so a video's tracks (ids up to the number of queries) take the most separated hues
    however far apart their ids are; other ids keep :func:`colours`' own."""
    ids = [int(i) for i in ids_best_first]
    n = max([size] + [i + 1 for i in ids])
    base = colours(max(n, len(ids) + 1))
    out = base[:n].copy()
    for rank, value in enumerate(ids):
        out[value] = base[rank + 1]
    return out


def text_scale(height: int, width: int) -> int:
    """Whole-pixel font scale for a frame: 1 up to 320 px on the short side, then one more per 240 px."""
    return max(1, 1 + (min(height, width) - 80) // 240)


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """``(height, width)`` in pixels of ``text`` drawn at ``scale`` (one column of spacing per glyph)."""
    return GLYPH_H * scale, max(0, len(text) * (GLYPH_W + 1) * scale - scale)


def draw_text(image: np.ndarray, text: str, y: int, x: int, colour=(255, 255, 255), scale: int = 1,
              background=None, pad: int = 1) -> None:
    """Draw ``text`` with its top-left corner at ``(y, x)`` into ``image`` ``(H, W, 3)`` uint8, in place;
    ``background`` fills a box ``pad * scale`` pixels around it. Whatever falls outside is clipped."""
    height, width = text_size(text, scale)
    if background is not None:
        p = pad * scale
        _fill(image, y - p, x - p, height + 2 * p, width + 2 * p, background)
    for i, ch in enumerate(text.upper()):
        bitmap = _BITMAPS.get(ch, _BITMAPS["?"])
        if scale > 1:
            bitmap = bitmap.repeat(scale, 0).repeat(scale, 1)
        gx = x + i * (GLYPH_W + 1) * scale
        y0, x0 = max(y, 0), max(gx, 0)
        y1, x1 = min(y + bitmap.shape[0], image.shape[0]), min(gx + bitmap.shape[1], image.shape[1])
        if y1 <= y0 or x1 <= x0:
            continue
        region = image[y0:y1, x0:x1]
        region[bitmap[y0 - y : y1 - y, x0 - gx : x1 - gx]] = colour


def _fill(image: np.ndarray, y: int, x: int, height: int, width: int, colour) -> None:
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + height, image.shape[0]), min(x + width, image.shape[1])
    if y1 > y0 and x1 > x0:
        image[y0:y1, x0:x1] = colour


def outlines(ids: np.ndarray, thickness: int = 1) -> np.ndarray:
    """``(H, W)`` bool: labelled pixels (id > 0) with a 4-neighbour of another id, grown inwards to
    ``thickness`` pixels."""
    ids = np.asarray(ids)
    edge = np.zeros(ids.shape, bool)
    inside = ids > 0
    for _ in range(max(1, thickness)):
        differs = np.zeros(ids.shape, bool)
        differs[1:] |= ids[1:] != ids[:-1]
        differs[:-1] |= ids[:-1] != ids[1:]
        differs[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        differs[:, :-1] |= ids[:, :-1] != ids[:, 1:]
        edge |= differs & inside
        ids = np.where(edge, -1, ids)  # the next ring sees the outline as a border
    return edge


def _anchor(mask: np.ndarray) -> tuple[int, int]:
    """A pixel of ``mask`` near its centroid (the centroid itself when it lies inside)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(ys[k]), int(xs[k])


CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")


def legend_size(legend: Mapping[int, str], scale: int) -> tuple[int, int]:
    """``(height, width)`` in pixels of the legend box of ``legend`` at ``scale``."""
    line = (GLYPH_H + 3) * scale
    width = max(text_size(t, scale)[1] for t in legend.values()) + GLYPH_H * scale + 4 * scale
    return len(legend) * line + 3 * scale, width + 2 * scale


def _corner_box(corner: str, box: tuple[int, int], shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(y, x, height, width)`` of a box of size ``box`` in ``corner`` of an image of ``shape``."""
    h, w = min(box[0], shape[0]), min(box[1], shape[1])
    y = 0 if corner.startswith("top") else shape[0] - h
    x = 0 if corner.endswith("left") else shape[1] - w
    return y, x, h, w


def legend_corner(occupancy: np.ndarray, box: tuple[int, int], previous: str | None = None) -> str:
    """The corner where a box of size ``box`` covers the least of ``occupancy`` ``(H, W)`` (labelled pixels,
    or counts of them over a video); ties keep ``previous``, else the first of :data:`CORNERS`."""
    cover = {}
    for corner in CORNERS:
        y, x, h, w = _corner_box(corner, box, occupancy.shape)
        cover[corner] = float(occupancy[y : y + h, x : x + w].sum())
    best = min(cover.values())
    if previous in cover and cover[previous] <= best:
        return previous
    return next(c for c in CORNERS if cover[c] <= best)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _place(y: int, x: int, size: tuple[int, int], shape: tuple[int, int], taken: list, margin: int):
    """Top-left of a ``size`` box near ``(y, x)`` (its centre) inside ``shape`` that overlaps none of
    ``taken`` (boxes ``(y, x, h, w)`` with ``margin`` around them), trying steps away from the centre; the
    centre itself when nowhere is free."""
    th, tw = size

    def clamp(cy: int, cx: int) -> tuple[int, int]:
        return (min(max(cy - th // 2, margin), max(margin, shape[0] - th - margin)),
                min(max(cx - tw // 2, margin), max(margin, shape[1] - tw - margin)))

    step_y, step_x = th + 2 * margin, tw + 2 * margin
    tries = [(0, 0)] + [(dy * k, dx * k) for k in (1, 2, 3) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1),
                                                                          (1, 1), (-1, -1), (1, -1), (-1, 1))]
    for dy, dx in tries:
        ty, tx = clamp(y + dy * step_y, x + dx * step_x)
        box = (ty - margin, tx - margin, th + 2 * margin, tw + 2 * margin)
        if not any(_overlaps(box, other) for other in taken):
            return ty, tx, box
    ty, tx = clamp(y, x)
    return ty, tx, (ty - margin, tx - margin, th + 2 * margin, tw + 2 * margin)


def draw_overlay(
    frame: np.ndarray,
    ids: np.ndarray,
    legend: Mapping[int, str] | None = None,
    tags: Mapping[int, str] | None = None,
    palette: np.ndarray | None = None,
    alpha: float = 0.5,
    corner: str | None = None,
) -> np.ndarray:
    """A copy of ``frame`` ``(H, W, 3)`` uint8 with the regions of ``ids`` ``(H, W)`` (0 = none) tinted
    with ``palette[id % len]`` (default :func:`colours`), outlined in their colour, each tagged with
    ``tags[id]`` (default the id) near its centre (moved aside where it would cover another tag or the
    legend), and ``legend`` (id -> text, in its order) listed with a colour swatch per entry in ``corner``
    (one of :data:`CORNERS`; default: the one covering the fewest labelled pixels of this frame). Pass the
    whole video's legend and one corner for the video to keep it still."""
    frame = np.asarray(frame)
    ids = np.asarray(ids)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"draw_overlay: frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    if ids.shape != frame.shape[:2]:
        raise ValueError(f"draw_overlay: ids must be (H, W) = {frame.shape[:2]}, got {ids.shape}")
    palette = colours(256) if palette is None else np.asarray(palette, np.uint8)
    ids = ids.astype(np.int64)
    tint = palette[ids % len(palette)]
    labelled = (ids > 0)[..., None]
    out = np.where(labelled, (frame * (1 - alpha) + tint * alpha).astype(np.uint8), frame)
    scale = text_scale(*frame.shape[:2])
    edge = outlines(ids, thickness=scale + 1)
    out[edge] = tint[edge]
    present = [int(v) for v in np.unique(ids) if v > 0]
    taken = []  # boxes already drawn: the legend's, then each tag's
    legend_box = None
    if legend:
        if corner is None:
            corner = legend_corner(ids > 0, legend_size(legend, scale))
        if corner not in CORNERS:
            raise ValueError(f"draw_overlay: corner must be one of {CORNERS}, got {corner!r}")
        legend_box = _corner_box(corner, legend_size(legend, scale), frame.shape[:2])
        taken.append(legend_box)
    for value in present:
        text = str(value) if tags is None else tags.get(value, str(value))
        if not text:
            continue
        y, x = _anchor(ids == value)
        ty, tx, box = _place(y, x, text_size(text, scale), frame.shape[:2], taken, scale)
        taken.append(box)
        draw_text(out, text, ty, tx, (255, 255, 255), scale, background=(0, 0, 0))
    if legend_box is not None:
        line = (GLYPH_H + 3) * scale
        swatch = GLYPH_H * scale
        by, bx, bh, bw = legend_box
        _fill(out, by, bx, bh, bw, (0, 0, 0))
        for row, (value, text) in enumerate(legend.items()):
            y = by + 2 * scale + row * line
            _fill(out, y, bx + 2 * scale, swatch, swatch, palette[value % len(palette)])
            colour = (255, 255, 255) if value in present else (140, 140, 140)  # grey: not in this frame
            draw_text(out, text, y, bx + swatch + 4 * scale, colour, scale)
    return out


__all__ = ["CORNERS", "GLYPH_H", "GLYPH_W", "colours", "draw_overlay", "draw_text", "legend_corner", "legend_size",
           "outlines", "ranked_palette", "text_scale", "text_size"]
