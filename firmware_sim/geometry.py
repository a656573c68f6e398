"""Plane geometry for the simulator, vectorised with numpy: polygons, zones, wall crossings.

Coordinates are metres in the scenario's plan frame. Every function takes and returns arrays,
so the simulator can ask about thousands of points or transmitter-receiver paths at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gateway.config import points_in_polygon as points_in_polygon  # one rule for zones, here and in the gateway

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]


def as_polygon(points: Sequence[tuple[float, float]]) -> F64:
    """Corners as a (k, 2) float array."""
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


def polygon_area(polygon: F64) -> float:
    """Area by the shoelace formula, m²."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def zone_index(x: F64, y: F64, polygons: Sequence[F64]) -> I64:
    """Index of the first polygon containing each point, -1 where none does."""
    out = np.full(np.shape(x), -1, dtype=np.int64)
    for i, poly in enumerate(polygons):
        hit = (out < 0) & points_in_polygon(x, y, poly)
        out[hit] = i
    return out


def wall_loss(ax: F64, ay: F64, bx: F64, by: F64, walls: F64, loss_db: F64) -> F64:
    """Summed loss (dB) of the walls each path a→b crosses; arrays broadcast together.

    `walls` is (w, 4): x1, y1, x2, y2 per wall segment. A path crosses a wall when each
    segment's end points lie strictly on opposite sides of the other; a transmitter or
    receiver exactly on a wall (a receiver mounted on it) is not attenuated by that wall.
    """
    shape = np.broadcast_shapes(np.shape(ax), np.shape(bx))
    total = np.zeros(shape, dtype=np.float64)
    dx, dy = bx - ax, by - ay
    for (x1, y1, x2, y2), loss in zip(walls, loss_db, strict=True):
        wx, wy = x2 - x1, y2 - y1
        s1 = wx * (ay - y1) - wy * (ax - x1)
        s2 = wx * (by - y1) - wy * (bx - x1)
        s3 = dx * (y1 - ay) - dy * (x1 - ax)
        s4 = dx * (y2 - ay) - dy * (x2 - ax)
        total += np.where((s1 * s2 < 0) & (s3 * s4 < 0), loss, 0.0)
    return total
