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
second coordinate is ``b + 0.25`` or ``b + 0.75``, so it never passes through a pixel centre or a
vertex, and never runs along an outline edge: a reader sampling pixel centres cannot be tipped by
rounding. The joining itself is written here (no library in use builds keyholes; the
polygon libraries that can, e.g. shapely, do not keep the cut off pixel centres): the ray-cast
hole bridging of ear-clipping triangulation (a ray from the hole to the first boundary it meets),
cast against all edges at once.
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


def _cut_line(hole: np.ndarray) -> float:
    """The line ``j == c`` the hole's cut runs on: ``c = b + 0.25`` or ``b + 0.75`` through the middle
    of the hole, so no outline vertex (multiples of 0.5) and no pixel centre (integers) lies on it."""
    lo, hi = float(hole[:, 1].min()), float(hole[:, 1].max())
    candidates = [v for v in np.arange(np.floor(lo) + 0.25, hi, 0.5) if lo < v < hi]
    return float(candidates[len(candidates) // 2])


class _Edges:
    """Every edge of a region's rings (its outer boundary first, then its holes) in flat arrays, so
    one ray is cast against all of them at once."""

    def __init__(self, rings: list[np.ndarray]) -> None:
        self.a = np.concatenate(rings)
        self.b = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
        self.ring = np.concatenate([np.full(len(r), n) for n, r in enumerate(rings)])
        self.index = np.concatenate([np.arange(len(r)) for r in rings])

    def crossings(self, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(edge ids, i, t)`` where the line ``j == c`` crosses an edge (``t``: 0..1 along it). No
        vertex lies on the line, so every crossing is a proper one."""
        aj, bj = self.a[:, 1], self.b[:, 1]
        e = np.flatnonzero((aj - c) * (bj - c) < 0)
        t = (c - aj[e]) / (bj[e] - aj[e])
        return e, self.a[e, 0] + t * (self.b[e, 0] - self.a[e, 0]), t


def _join(rings: list[np.ndarray]) -> np.ndarray:
    """One contour of a region: ``rings[0]`` its outer boundary, the rest its holes.

    Each hole (or group of holes already joined) casts a ray along +i from its last crossing ``p``
    with the line :func:`_cut_line` picked; the first boundary the ray meets (``q``: the outer one or
    another hole's) gets the cut ``p``-``q``, and the two groups become one (union-find), until all
    are joined to the outer boundary. The rings are never changed: cuts lie on lines parallel to i,
    so they never cross a later ray, and the contour is assembled at the end by walking the tree of
    cuts (iteratively: a chain of thousands of holes must not hit Python's recursion limit)."""
    edges = _Edges(rings)
    parent = list(range(len(rings)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    # attachments[ring] = [(edge index, t, point, cut id)]; cuts[id] = ((ring, edge, t, point), (ring, edge, t, point))
    attachments: list[list[tuple[int, float, np.ndarray, int]]] = [[] for _ in rings]
    cuts: list[tuple[tuple[int, int, float, np.ndarray], tuple[int, int, float, np.ndarray]]] = []
    for h in range(1, len(rings)):
        while find(h) != find(0):
            c = _cut_line(rings[h])
            e, x, t = edges.crossings(c)
            group = find(h)
            mine = np.array([find(int(r)) == group for r in edges.ring[e]])
            k = int(np.argmax(np.where(mine, x, -np.inf)))  # the group's last crossing: the cut starts here
            ahead = x > x[k]
            if not ahead.any():  # cannot happen inside an outer boundary; leave the hole unjoined
                break
            q = int(np.argmin(np.where(ahead, x, np.inf)))  # the first boundary the ray meets
            ends = []
            for n in (k, q):
                ring, edge = int(edges.ring[e[n]]), int(edges.index[e[n]])
                ends.append((ring, edge, float(t[n]), np.array([x[n], c])))
                attachments[ring].append((edge, float(t[n]), ends[-1][3], len(cuts)))
            cuts.append((ends[0], ends[1]))
            parent[group] = find(ends[1][0])

    for att in attachments:
        att.sort(key=lambda a: (a[0], a[1]))

    def walk(ring: int, entry: tuple[int, float, int] | None):
        """The items around ``ring`` after the entry point (edge, t, cut id), or from vertex 0."""
        r, att = rings[ring], attachments[ring]
        n = len(r)
        m0, t0, via = entry if entry is not None else (n - 1, 1.0, -1)
        later = [a for a in att if a[0] == m0 and a[1] > t0 and a[3] != via]
        yield from later
        for step in range(1, n + 1):
            m = (m0 + step) % n
            yield r[m]
            if step < n:
                yield from (a for a in att if a[0] == m and a[3] != via)
        yield from (a for a in att if a[0] == m0 and a[1] < t0 and a[3] != via)

    out: list[np.ndarray] = []
    stack = [walk(0, None)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        if isinstance(item, np.ndarray):
            out.append(item)
            continue
        _, _, here, cut = item
        a, b = cuts[cut]
        there = b if a[3] is here else a
        out += [here, there[3]]  # along the cut to the other boundary
        stack.append(iter([there[3], here]))  # ... and back, after going round it
        stack.append(walk(there[0], (there[1], there[2], cut)))
    return np.asarray(out)


def keyhole_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2D boolean ``plane`` (indexed ``[i, j]``), one per region: each region's
    holes are joined to its outer boundary by zero-width cuts along the first axis (module docstring).
    Returns ``(n, 2)`` (i, j) arrays; filling each one (even-odd or nonzero rule alike) and OR-ing
    them gives the plane back."""
    from skimage.measure import points_in_poly

    rings = outlines(plane)
    outers = [r for r in rings if _signed_area(r) > 0]
    holes = [r for r in rings if _signed_area(r) < 0]
    if not holes:
        return outers
    areas = np.array([_signed_area(r) for r in outers])
    lo = np.array([o.min(axis=0) for o in outers])
    hi = np.array([o.max(axis=0) for o in outers])
    groups: list[list[np.ndarray]] = [[o] for o in outers]
    for h in holes:
        # the enclosing outer boundary: the smallest one that holds the hole's first point (outlines
        # never touch, so one point decides); bounding boxes first, so few polygons are tested
        pt = h[0]
        near = np.flatnonzero(np.all((lo <= pt) & (pt <= hi), axis=1))
        for n in near[np.argsort(areas[near])]:
            if points_in_poly(h[:1], outers[n])[0]:
                groups[n].append(h)
                break
    return [_join(g) if len(g) > 1 else g[0] for g in groups]
