"""How well phrase maps ground the objects they name: three figures on patch maps and pixel boxes.

A phrase map is a distribution over a grid x grid patch grid (row-major) laid over an image of
size (W, H); a box is (x0, y0, x1, y1) in that image's pixels.

- **Pointing game** (`pointing_hits`): does the map's peak fall inside the box?
- **Energy** (`box_energy`): the share of the map's mass inside the box, each patch's mass spread
  evenly over its pixels (flat upsampling); its chance level is the box's share of the image
  (`box_share`), what a uniform map scores.
- **Distinctness** (`distinct_peaks`): of a caption's phrases that name objects with disjoint
  boxes, do all peak on different patches? A map that ignores the phrase peaks on the same patch
  for all of them.
"""
from __future__ import annotations

import torch


def peak_points(patch_maps: torch.Tensor, grid: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """patch_maps [K, grid*grid] -> the (x, y) pixel points [K] each, [K] where each map peaks.

    The point is the argmax of the map upsampled bilinearly to the image, taken where bilinear
    interpolation puts its maximum: the centre of the highest patch (interpolation between patch
    centres never exceeds its corners). This also settles the constant border strip that
    `F.interpolate` leaves around edge patches, whose first pixel (the image border) would
    otherwise be the argmax."""
    w, h = size
    idx = patch_maps.float().flatten(1).argmax(1)
    return (idx % grid + 0.5) * w / grid, (idx // grid + 0.5) * h / grid


def pointing_hits(patch_maps: torch.Tensor, grid: int, size: tuple[int, int], box) -> torch.Tensor:
    """patch_maps [K, grid*grid]: does each map's peak point fall inside `box`? -> [K] bool."""
    x, y = peak_points(patch_maps, grid, size)
    x0, y0, x1, y1 = box
    return (x0 <= x) & (x <= x1) & (y0 <= y) & (y <= y1)


def _overlap(a0: torch.Tensor, a1: torch.Tensor, b0: float, b1: float) -> torch.Tensor:
    return (torch.minimum(a1, torch.tensor(b1)) - torch.maximum(a0, torch.tensor(b0))).clamp_min(0)


def box_energy(patch_maps: torch.Tensor, grid: int, size: tuple[int, int], box) -> torch.Tensor:
    """patch_maps [K, grid*grid] (non-negative) -> [K]: the share of each map's mass inside `box`,
    every patch's mass spread evenly over its pixels."""
    w, h = size
    x0, y0, x1, y1 = box
    edges_x = torch.arange(grid + 1, dtype=torch.float64) * w / grid
    edges_y = torch.arange(grid + 1, dtype=torch.float64) * h / grid
    fx = _overlap(edges_x[:-1], edges_x[1:], x0, x1) / (w / grid)  # [grid] share of each column's width
    fy = _overlap(edges_y[:-1], edges_y[1:], y0, y1) / (h / grid)
    inside = (fy[:, None] * fx[None, :]).flatten()  # [grid*grid] share of each patch inside the box
    m = patch_maps.double().flatten(1)
    return (m @ inside) / m.sum(1).clamp_min(torch.finfo(torch.float64).tiny)


def box_share(size: tuple[int, int], box) -> float:
    """The share of the image inside `box`: the energy of a uniform map (chance level)."""
    w, h = size
    x0, y0, x1, y1 = box
    return max(0.0, min(x1, w) - max(x0, 0)) * max(0.0, min(y1, h) - max(y0, 0)) / (w * h)


def disjoint(a, b) -> bool:
    """Whether boxes a and b share no pixel area."""
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def distinct_peaks(peaks: list[int], boxes: list) -> bool | None:
    """One caption's phrases (peak patch index and box of the object each names): do the phrases of
    every pair of disjoint boxes peak on different patches? None when no pair is disjoint (the
    caption does not count)."""
    pairs = [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes)) if disjoint(boxes[i], boxes[j])]
    if not pairs:
        return None
    return all(peaks[i] != peaks[j] for i, j in pairs)
