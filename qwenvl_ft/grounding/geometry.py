"""Box and point geometry: IoU, the matched IoU of a set of predicted boxes against the reference boxes, and point
in box. Boxes are (x1, y1, x2, y2) with x2 > x1 and y2 > y1, points (x, y), all in one frame."""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

Box = Tuple[float, float, float, float]
Point = Tuple[float, float]


def well_formed(box: Sequence[float]) -> bool:
    """Four finite numbers with a positive area."""
    return len(box) == 4 and all(math.isfinite(v) for v in box) and box[2] > box[0] and box[3] > box[1]


def iou(a: Box, b: Box) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_iou(predicted: Sequence[Box], references: Sequence[Box]) -> float:
    """Each reference box is matched to at most one predicted box (greedily, highest IoU first), and the matched
    IoUs are summed and divided by the larger of the two counts: one box against one box is their IoU, a missed
    reference counts 0, and so does every extra predicted box (answering with many boxes does not pay). 0 when
    either side is empty."""
    if not predicted or not references:
        return 0.0
    pairs = sorted(((iou(p, r), i, j) for i, p in enumerate(predicted) for j, r in enumerate(references)),
                   reverse=True)
    used_p, used_r, total = set(), set(), 0.0
    for overlap, i, j in pairs:
        if overlap <= 0 or i in used_p or j in used_r:
            continue
        used_p.add(i)
        used_r.add(j)
        total += overlap
    return total / max(len(predicted), len(references))


def point_in_box(point: Point, box: Box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def boxes_of(marks: Sequence[Sequence[float]]) -> List[Box]:
    return [tuple(m) for m in marks if len(m) == 4 and well_formed(m)]
