"""Geometry of weight space for studying SWAP: the plane through three models (paper section 4,
Figures 2-3) and the cosine between a worker's descent direction and the direction to the average (section 4.2,
Figure 4). Pure functions of flat float64 parameter vectors, shared by `landscape` and `cosine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class LandscapeError(ValueError):
    """A plane or trajectory that cannot be drawn, phrased as one line for the user."""


def flat_parameters(module: torch.nn.Module) -> torch.Tensor:
    """Every parameter in one new float64 vector (BN statistics are not weights: they are recomputed)."""
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


@torch.no_grad()
def set_parameters_(module: torch.nn.Module, flat: torch.Tensor) -> None:
    params = list(module.parameters())
    for p, chunk in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.copy_(chunk.view(p.shape))  # float64 -> the parameter's own dtype and memory format


@dataclass
class Plane:
    """θ(x, y) = origin + x u + y v, with u, v orthonormal (float64, for exact coordinates)."""

    origin: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    def coords(self, theta: torch.Tensor) -> tuple[float, float]:
        d = theta - self.origin
        return float(d @ self.u), float(d @ self.v)

    def at(self, x: float, y: float) -> torch.Tensor:
        return self.origin + x * self.u + y * self.v


def plane_through(t1: torch.Tensor, t2: torch.Tensor, t3: torch.Tensor) -> Plane:
    d2, d3 = t2 - t1, t3 - t1
    if float(d2.norm()) == 0.0:
        raise LandscapeError("the first two models are identical: they span no plane; choose other --points")
    u = d2 / d2.norm()
    w = d3 - (d3 @ u) * u
    if float(w.norm()) <= 1e-9 * max(float(d3.norm()), 1e-30):
        raise LandscapeError("the three models lie on one line: they span no plane; choose other --points")
    return Plane(t1, u, w / w.norm())


def grid_axes(coords: list[tuple[float, float]], grid: int, margin: float = 0.3) -> tuple[list[float], list[float]]:
    """Evenly spaced axes over the three models' box, widened by `margin` of its extent on each side (Figure 2)."""
    axes = []
    for values in zip(*coords, strict=True):
        lo, hi = min(values), max(values)
        pad = margin * (hi - lo)
        axes.append(torch.linspace(lo - pad, hi + pad, grid, dtype=torch.float64).tolist())
    return axes[0], axes[1]


def direction_cosine(theta: torch.Tensor, target: torch.Tensor, grad: torch.Tensor) -> float:
    """cos(θ_target - θ, -g) = <θ_target - θ, -g> / (|θ_target - θ| |g|): 1 when the descent direction points straight
    at the target (section 4.2 shows it falling as a worker's phase 2 goes on)."""
    to_target = (target - theta).double()
    descent = -grad.double()
    denominator = float(to_target.norm() * descent.norm())
    if denominator == 0.0:
        raise LandscapeError("the cosine is undefined at the target itself or at a zero gradient")
    return float(to_target @ descent) / denominator
