"""Planar outlines of a 2D mask for RTSTRUCT: one closed contour per region, holes joined by keyholes.

Planning systems and converters read the contours of one structure on one slice in two ways: some
OR them (every contour adds area; plastimatch's default and many treatment planning systems),
others XOR them (the even-odd rule: a contour inside another cuts a hole). A hole written as its
own inner contour reads right only in the second kind. So each region with holes is written as ONE
closed contour: the outer boundary, joined to each hole's boundary by a zero-width cut (the
"keyhole": the contour runs along the cut to the hole, around it, and back along the same cut).
Both kinds of reader fill exactly the region: the cut has no area, and an island inside a hole is
its own contour, disjoint from the region around it.

Outlines come from scikit-image's marching squares (``measure.find_contours`` at level 0.5, so
each outline runs midway between inside and outside pixel centres). Its vertices lie on
coordinates that are multiples of 0.5 pixel; each cut runs along the first axis on a line whose
second coordinate is ``b + 0.25`` (or ``b + 0.75``), so it never passes through a pixel centre
or a vertex, and never runs along an outline edge: a reader sampling pixel centres cannot be
tipped by rounding. The joining itself is written here (no library in use builds keyholes; the
polygon libraries that can, e.g. shapely, do not keep the cut off pixel centres): the ray-cast
hole bridging of ear-clipping triangulation (a ray from the hole to the first boundary it meets).
"""

from __future__ import annotations

import numpy as np


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _drop_collinear(c: np.ndarray) -> np.ndarray:
    """Drop points on a straight run (lossless; skimage's approximate_polygon imports scipy.signal, ~3 s)."""
    before, after = c - np.roll(c, 1, axis=0), np.roll(c, -1, axis=0) - c
    return c[np.abs(before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]) > 1e-9]


def outlines(plane: np.ndarray) -> list[np.ndarray]:
    """Every closed outline of a 2D boolean ``plane`` indexed ``[i, j]``: list of ``(n, 2)`` (i, j)
    arrays, the first point not repeated. Outer boundaries and hole boundaries wind in opposite
    directions (positive signed area: an outer boundary)."""
    from skimage.measure import find_contours

    padded = np.pad(plane.astype(np.float32), 1)  # so outlines touching the border still close
    out = []
    for c in find_contours(padded, 0.5, positive_orientation="high"):
        c = c - 1.0
        if len(c) > 1 and np.allclose(c[0], c[-1]):
            c = c[:-1]  # DICOM closed contours do not repeat the first point
        c = _drop_collinear(c)
        if len(c) >= 3:
            out.append(c)
    return out


def _crossings(ring: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """``(edge index m, i)`` where the line ``j == c`` crosses the ring's edge ``m -> m+1``.

    No vertex lies on the line (vertices are on multiples of 0.5, or on earlier cuts' lines, which
    are never reused), so every crossing is a proper one."""
    a, b = ring, np.roll(ring, -1, axis=0)
    m = np.flatnonzero((a[:, 1] - c) * (b[:, 1] - c) < 0)
    t = (c - a[m, 1]) / (b[m, 1] - a[m, 1])
    return m, a[m, 0] + t * (b[m, 0] - a[m, 0])


def _cut_line(hole: np.ndarray, used: set[float]) -> float:
    """A line ``j == c`` (c = b + 0.25 or b + 0.75, not used by an earlier cut) that crosses ``hole``."""
    lo, hi = float(hole[:, 1].min()), float(hole[:, 1].max())
    first = np.floor(lo * 2.0) / 2.0 + 0.25
    candidates = [v for v in np.arange(first, hi, 0.5) if lo < v < hi and v not in used]
    if not candidates:  # every line through this hole is taken: a quarter-step between them
        candidates = [v for v in np.arange(first + 0.125, hi, 0.25) if lo < v < hi and v not in used]
    return float(candidates[len(candidates) // 2])


def _splice(target: np.ndarray, edge: int, q: np.ndarray, hole: np.ndarray, hole_edge: int, p: np.ndarray) -> np.ndarray:
    """``target`` with ``hole`` joined in: ... target[edge], q, p, hole[hole_edge+1:], hole[:hole_edge+1], p, q,
    target[edge+1] ...; ``q`` lies on target's edge ``edge``, ``p`` on hole's edge ``hole_edge``."""
    around = np.concatenate([hole[hole_edge + 1:], hole[: hole_edge + 1]])
    return np.concatenate([target[: edge + 1], q[None], p[None], around, p[None], q[None], target[edge + 1:]])


def keyhole_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D boolean ``plane`` (indexed ``[i, j]``), one per region: each region's
    holes are joined to its outer boundary by zero-width cuts along the first axis (module docstring).
    Returns ``(n, 2)`` (i, j) arrays; filling each one (even-odd or nonzero rule alike) and OR-ing
    them gives the plane back (up to what marching squares itself loses)."""
    from skimage.measure import points_in_poly

    rings = outlines(plane)
    outers = [r for r in rings if _signed_area(r) > 0]
    holes = [r for r in rings if _signed_area(r) < 0]
    if not holes:
        return outers
    areas = [_signed_area(r) for r in outers]
    groups: dict[int, list[np.ndarray]] = {n: [] for n in range(len(outers))}
    for h in holes:
        # the enclosing outer boundary: the smallest one that holds the hole's first point (outlines
        # never touch, so one point decides)
        inside = [n for n, o in enumerate(outers) if points_in_poly(h[:1], o)[0]]
        if inside:  # always, for marching squares outlines of a padded plane
            groups[min(inside, key=lambda n: areas[n])].append(h)
    result = []
    for n, outer in enumerate(outers):
        pending = list(groups[n])
        used: set[float] = set()
        while pending:
            hole = pending.pop()
            c = _cut_line(hole, used)
            used.add(c)
            m, xs = _crossings(hole, c)
            k = int(np.argmax(xs))
            p = np.array([xs[k], c])  # where the cut leaves the hole (its last crossing along +i)
            best: tuple[float, int, int] | None = None  # (i, ring index: -1 outer, edge)
            for r, ring in enumerate([outer, *pending]):
                em, ex = _crossings(ring, c)
                ahead = ex > p[0]
                if ahead.any():
                    e = int(np.argmin(np.where(ahead, ex, np.inf)))
                    if best is None or ex[e] < best[0]:
                        best = (float(ex[e]), r - 1, int(em[e]))
            if best is None:  # cannot happen for a hole inside its outer boundary; keep it as it was
                result.append(hole)
                continue
            q = np.array([best[0], c])
            if best[1] < 0:  # the first boundary along the cut is the outer one: join the hole to it
                outer = _splice(outer, best[2], q, hole, int(m[k]), p)
            else:  # another hole comes first: join the two holes; the pair is joined out later
                other = best[1]
                pending[other] = _splice(pending[other], best[2], q, hole, int(m[k]), p)
        result.append(outer)
    return result
