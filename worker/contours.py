"""Masks to closed planar contours that follow the pixel edges, vectorised with numpy.

Hand-written because no well-kept library traces pixel-edge outlines (with holes) as
polygons: skimage's marching squares and OpenCV trace through pixel centres or half-pixel
midpoints, which shrinks every structure by half a pixel and loses single-pixel parts.

Every boundary pixel edge becomes a directed edge with the structure on its right (image
display: row down, column right); edges are linked into cycles, at once for a whole 3-D mask.
Outer boundaries run clockwise on screen, holes counter-clockwise, and each is its own
contour. Where two pixels touch only at a corner the outline hugs each pixel, so diagonal
neighbours are separate islands (4-connectivity). Filling the contours with the even-odd
rule at pixel centres gives back the mask exactly (unless specks are dropped or smoothing is
on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from rtcontour.common.volume import Volume

logger = logging.getLogger(__name__)

# Edge directions as (row, column) steps, clockwise on screen: a right turn is +1.
_EAST, _SOUTH, _WEST, _NORTH = 0, 1, 2, 3
_STEP = np.array([[0, 1], [1, 0], [0, -1], [-1, 0]], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class Contour:
    """One closed planar contour on one slice.

    ``slice_index``: the slice (axis 0) of the volume it lies on. ``points_mm``: (n, 3) LPS mm,
    closed implicitly (the last point joins the first). ``is_hole``: bounds a hole in the
    structure. ``area_mm2``: enclosed area in mm^2 (positive for holes too).
    """

    slice_index: int
    points_mm: np.ndarray
    is_hole: bool
    area_mm2: float


@dataclass(frozen=True, eq=False)
class Outlines:
    """Linked outlines in pixel-corner coordinates (row, column of the vertex grid)."""

    slice_index: np.ndarray  # (k,) slice of each outline
    vertices: np.ndarray  # (m, 2) corner vertices of all outlines, outline after outline
    starts: np.ndarray  # (k + 1,) outline i is vertices[starts[i]:starts[i+1]]
    signed_area_px: np.ndarray  # (k,) > 0 outer, < 0 hole, in pixels


def mask_to_contours(
    mask: np.ndarray,
    volume: Volume,
    *,
    min_area_mm2: float = 0.0,
    smoothing: bool = False,
) -> list[Contour]:
    """Return the contours of a bool mask (slices, rows, columns) on ``volume``'s grid.

    Contours (outer and hole) enclosing less than ``min_area_mm2`` are dropped: small islands
    vanish and small holes are filled. ``smoothing`` cuts the staircase corners (Chaikin, two
    rounds); off by default because it breaks the exact round trip to the mask.
    """
    if mask.shape != volume.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {volume.shape}")
    outlines = trace_outlines(np.asarray(mask, dtype=bool))
    _, row_mm, col_mm = volume.spacing_mm
    areas_mm2 = np.abs(outlines.signed_area_px) * row_mm * col_mm
    contours = []
    for index in np.flatnonzero(areas_mm2 >= min_area_mm2):
        corners = outlines.vertices[outlines.starts[index] : outlines.starts[index + 1]]
        points = corners.astype(np.float64)
        if smoothing:
            points = chaikin(points, rounds=2)
        slice_index = int(outlines.slice_index[index])
        # Vertex (i, j) is the corner between pixels: index coordinates (i - 0.5, j - 0.5).
        indices = np.empty((len(points), 3))
        indices[:, 0] = slice_index
        indices[:, 1:] = points - 0.5
        contours.append(
            Contour(
                slice_index=slice_index,
                points_mm=volume.index_to_lps(indices),
                is_hole=bool(outlines.signed_area_px[index] < 0),
                area_mm2=float(areas_mm2[index]),
            )
        )
    dropped = len(areas_mm2) - len(contours)
    if dropped:
        logger.debug("dropped %d contours below %.3g mm2", dropped, min_area_mm2)
    return contours


def trace_outlines(mask: np.ndarray) -> Outlines:
    """Trace every pixel-edge outline of a bool mask (slices, rows, columns).

    Vertices are corners of the pixel grid: (i, j) is the top-left corner of pixel (i, j).
    Collinear vertices are removed, so each outline lists only its corners.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D (slices, rows, columns), got shape {mask.shape}")
    empty = Outlines(
        np.zeros(0, np.int64), np.zeros((0, 2), np.int64), np.zeros(1, np.int64), np.zeros(0)
    )
    # Crop to the bounding box (one pixel of margin comes from the padding below); slices
    # first, as one contiguous pass, then rows and columns from the in-plane projection.
    slices_any = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if slices_any.size == 0:
        return empty
    slice0 = int(slices_any[0])
    in_plane = np.any(mask[slice0 : slices_any[-1] + 1], axis=0)
    rows_any = np.flatnonzero(in_plane.any(axis=1))
    cols_any = np.flatnonzero(in_plane.any(axis=0))
    row0, col0 = int(rows_any[0]), int(cols_any[0])
    cropped = mask[slice0 : slices_any[-1] + 1, row0 : rows_any[-1] + 1, col0 : cols_any[-1] + 1]
    slices, edge_rows, edge_cols, directions = _boundary_edges(cropped)
    n_rows, n_cols = cropped.shape[1] + 1, cropped.shape[2] + 1  # vertex grid per slice
    vertex = (slices * n_rows + edge_rows) * n_cols + edge_cols
    end_rows = edge_rows + _STEP[directions, 0]
    end_cols = edge_cols + _STEP[directions, 1]
    end_vertex = (slices * n_rows + end_rows) * n_cols + end_cols
    following = _link(vertex, end_vertex, directions)
    labels, order, starts = _cycles(following)
    # Keep only corners: edges whose direction differs from the previous edge's.
    previous = np.empty_like(following)
    previous[following] = np.arange(len(following))
    is_corner = directions != directions[previous]
    ordered_corner = is_corner[order]
    kept = order[ordered_corner]
    kept_labels = labels[kept]
    corner_starts = np.searchsorted(kept_labels, np.arange(len(starts)), side="left")
    corner_starts = np.append(corner_starts, len(kept))
    vertices = np.stack([edge_rows[kept] + row0, edge_cols[kept] + col0], axis=1)
    # Shoelace over all edges of each cycle (x = column, y = row): outer > 0, hole < 0.
    cross = edge_cols * end_rows - end_cols * edge_rows
    signed_area = 0.5 * np.bincount(labels, weights=cross, minlength=len(starts))
    return Outlines(
        slice_index=slices[order[starts]] + slice0,
        vertices=vertices,
        starts=corner_starts,
        signed_area_px=signed_area,
    )


def _boundary_edges(
    mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Directed boundary edges (structure on the right): slice, start row, start col, dir."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    inner = padded[:, 1:-1, 1:-1]
    parts = []
    # (neighbour view, direction, start-vertex offset from the pixel's top-left corner)
    for neighbour, direction, (d_row, d_col) in (
        (padded[:, :-2, 1:-1], _EAST, (0, 0)),  # top edge
        (padded[:, 1:-1, 2:], _SOUTH, (0, 1)),  # right edge
        (padded[:, 2:, 1:-1], _WEST, (1, 1)),  # bottom edge
        (padded[:, 1:-1, :-2], _NORTH, (1, 0)),  # left edge
    ):
        s, r, c = np.nonzero(inner & ~neighbour)
        parts.append((s, r + d_row, c + d_col, np.full(len(s), direction, np.int64)))
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))  # type: ignore[return-value]


def _link(vertex: np.ndarray, end_vertex: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """For each edge, the index of the edge that follows it around its outline.

    At a corner shared by two diagonal pixels two edges leave; the right turn is taken so the
    outline hugs the structure (straight on, then left, otherwise).
    """
    keys = vertex * 4 + directions
    order = np.argsort(keys)
    sorted_keys = keys[order]
    following = np.full(len(keys), -1, dtype=np.int64)
    for turn in (1, 0, 3):
        wanted = end_vertex * 4 + (directions + turn) % 4
        position = np.minimum(np.searchsorted(sorted_keys, wanted), len(keys) - 1)
        found = (sorted_keys[position] == wanted) & (following < 0)
        following[found] = order[position[found]]
    if np.any(following < 0):
        raise RuntimeError("an outline edge has no successor; the boundary is not closed")
    return following


def _cycles(following: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the successor permutation into cycles, each in walking order.

    Returns ``labels`` (cycle of each edge), ``order`` (edge indices, cycle after cycle, each
    in walking order from its lowest edge) and ``starts`` (offset of each cycle in ``order``).
    """
    n_edges = len(following)
    graph = csr_matrix(
        (np.ones(n_edges, np.int8), (np.arange(n_edges), following)), shape=(n_edges, n_edges)
    )
    n_cycles, labels = connected_components(graph, directed=True, connection="weak")
    lengths = np.bincount(labels, minlength=n_cycles)
    # Each cycle starts at its lowest edge; cut the cycle just before it and rank each edge by
    # its distance to the cut (pointer jumping: log2(longest cycle) vectorised rounds).
    first = np.full(n_cycles, n_edges, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n_edges))
    is_first = np.zeros(n_edges, dtype=bool)
    is_first[first] = True
    last = is_first[following]  # the edge whose successor starts the cycle
    jump = np.where(last, np.arange(n_edges), following)
    to_end = np.where(last, 0, 1).astype(np.int64)
    for _ in range(int(np.ceil(np.log2(max(int(lengths.max()), 2))))):
        to_end = to_end + to_end[jump]
        jump = jump[jump]
    position = lengths[labels] - 1 - to_end
    order = np.lexsort((position, labels))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return labels, order, starts


def chaikin(points: np.ndarray, rounds: int = 2) -> np.ndarray:
    """Cut the corners of a closed polygon (n, 2) ``rounds`` times (Chaikin), doubling n each."""
    for _ in range(rounds):
        following = np.roll(points, -1, axis=0)
        cut = np.empty((2 * len(points), points.shape[1]))
        cut[0::2] = 0.75 * points + 0.25 * following
        cut[1::2] = 0.25 * points + 0.75 * following
        points = cut
    return points
