"""The scaling-law fit of a sweep that varies model size and token budget: L(N, D) = E + A/N^alpha + B/D^beta,
fitted as in Chinchilla's approach 3 (Hoffmann et al. 2022, appendix D.2): a Huber loss on log L, minimised
with L-BFGS from the best points of a grid over the parameters, and the compute-optimal N and D for a FLOP
budget C = 6 N D. Pure numpy and scipy, so it runs (and is tested) without a cluster.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

from pipeline.errors import SweepError

HUBER_DELTA = 1e-3  # Chinchilla's: residuals of log L above 0.1% count linearly, so one outlier cannot steer
STARTS = 32  # L-BFGS runs from this many of the grid's best points
# The starting grid, in Chinchilla's parametrisation: log A, log B, log E and the exponents.
GRID = {
    "log_a": np.arange(0.0, 30.0, 5.0),
    "log_b": np.arange(0.0, 30.0, 5.0),
    "log_e": np.arange(-1.0, 1.5, 0.5),
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
}
MIN_POINTS = 5  # five parameters


@dataclass(frozen=True)
class ScalingFit:
    """The fitted law and how well it fits (the Huber objective at the optimum, the points used)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    points: int

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """N and D that minimise L(N, D) under 6 N D = flops (Chinchilla's eq. 4)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * (flops / 6.0) ** (self.beta / (self.alpha + self.beta))
        return float(n), float(flops / (6.0 * n))

    def as_dict(self) -> dict:
        return asdict(self)


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of the residuals and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float):
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L) and its gradient in theta."""
    log_a, log_b, log_e, alpha, beta = theta
    terms = np.stack([log_a - alpha * log_n, log_b - beta * log_d, np.full_like(log_n, log_e)])  # (3, points)
    value, slope = _huber(logsumexp(terms, axis=0) - log_l, delta)
    weights = softmax(terms, axis=0) * slope  # d LSE / d term, times dHuber / dr
    grad = np.array(
        [weights[0].sum(), weights[1].sum(), weights[2].sum(), -(weights[0] * log_n).sum(), -(weights[1] * log_d).sum()]
    )
    return value.sum(), grad


def _grid_starts(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> np.ndarray:
    """The STARTS grid points of lowest objective (the whole grid is scored in one vectorised pass)."""
    grid = np.array(list(itertools.product(*GRID.values())))  # (points of the grid, 5)
    log_a, log_b, log_e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack([log_a - alpha * log_n, log_b - beta * log_d, np.broadcast_to(log_e, (len(grid), len(log_n)))])
    value, _ = _huber(logsumexp(terms, axis=0) - log_l, delta)
    return grid[np.argsort(value.sum(axis=1))[:STARTS]]


def fit_scaling_law(params, tokens, losses, delta: float = HUBER_DELTA) -> ScalingFit:
    """Fit L(N, D) to final losses `losses` of models with `params` parameters trained on `tokens` tokens."""
    n, d, loss = (np.asarray(values, dtype=np.float64) for values in (params, tokens, losses))
    if len(n) < MIN_POINTS or len(set(n)) < 2 or len(set(d)) < 2:
        raise SweepError(
            f"a scaling-law fit needs at least {MIN_POINTS} finished trials over at least 2 model sizes and 2 "
            f"token budgets; this sweep has {len(n)} over {len(set(n))} sizes and {len(set(d))} budgets: "
            "sweep model.d_model (or n_layers) and train.max_steps together"
        )
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    bounds = [(None, None), (None, None), (None, None), (0.0, None), (0.0, None)]
    best = None
    for start in _grid_starts(log_n, log_d, log_l, delta):
        result = minimize(
            _objective, start, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B", bounds=bounds
        )
        if best is None or result.fun < best.fun:
            best = result
    log_a, log_b, log_e, alpha, beta = best.x
    return ScalingFit(
        E=float(np.exp(log_e)),
        A=float(np.exp(log_a)),
        B=float(np.exp(log_b)),
        alpha=float(alpha),
        beta=float(beta),
        objective=float(best.fun),
        points=len(n),
    )
