"""Sum-of-power-laws models fitted in log space: log L = LSE_j(c_j - sum_k e_jk * log x_jk).

Every law in this package has that form (see docs/method.md §4):
  loss curve   L(t)     = E + A t^-alpha
  Chinchilla   L(N,D)   = E + A N^-alpha + B D^-beta
  fine-grained L(N,D,G) = c + g G^-gamma N^-alpha + a N^-alpha + b D^-beta
so one objective with an analytic gradient serves all fits, and `optim.minimize_batched` runs the
whole grid of starts (and bootstrap replicates) at once. Shapes: B = problems, N = data points,
J = terms, P = parameters.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LawSpec:
    """A law as a sum of power-law terms; log-scale coefficients are named `log_<X>`."""

    name: str
    """Short name used in reports and the CLI."""
    params: tuple[str, ...]
    """Parameter names in vector order, e.g. ("log_E", "log_A", "alpha", ...)."""
    covariates: tuple[str, ...]
    """DataFrame columns the law reads, in the order of the X matrix columns."""
    terms: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]
    """Per term: (index of its log-coefficient, ((exponent index, covariate index), ...))."""

    def coefficients(self, theta_P: np.ndarray) -> dict[str, float]:
        """Named coefficients: log_X parameters exponentiated to X, exponents as they are."""
        out = {}
        for name, v in zip(self.params, theta_P, strict=True):
            if name.startswith("log_"):
                out[name[4:]] = float(np.exp(v))
            else:
                out[name] = float(v)
        return out

    def theta(self, coefficients: dict[str, float]) -> np.ndarray:
        """Inverse of `coefficients`."""
        return np.array(
            [np.log(coefficients[p[4:]]) if p.startswith("log_") else coefficients[p] for p in self.params]
        )

    def log_predict(self, theta_BP: np.ndarray, logx_NC: np.ndarray) -> np.ndarray:
        """(B, N) predicted log loss."""
        T_BJN = np.atleast_2d(theta_BP) @ self.design(logx_NC)
        T_BJN = T_BJN.reshape(T_BJN.shape[0], len(self.terms), -1)
        m_BN = T_BJN.max(axis=1)
        return m_BN + np.log(np.exp(T_BJN - m_BN[:, None]).sum(axis=1))

    def design(self, logx_NC: np.ndarray) -> np.ndarray:
        """(P, J*N) matrix with terms = theta @ design: +1 on a term's coefficient, -log x on exponents."""
        N = logx_NC.shape[0]
        A_PJN = np.zeros((len(self.params), len(self.terms), N))
        for j, (ci, exps) in enumerate(self.terms):
            A_PJN[ci, j] += 1.0
            for ei, xi in exps:
                A_PJN[ei, j] -= logx_NC[:, xi]
        return A_PJN.reshape(len(self.params), -1)


def huber(r, delta):
    c = np.clip(r, -delta, delta)
    return c * (r - 0.5 * c)


def make_objective(
    spec: LawSpec,
    logx_NC: np.ndarray,
    logy_N: np.ndarray,
    weights_RN: np.ndarray,
    delta: float,
    problem_to_weights: np.ndarray,
):
    """Summed Huber objective on log residuals and its analytic gradient, for `minimize_batched`.

    weights_RN holds one row of point weights per data replicate (all ones for a plain fit, bootstrap
    counts otherwise); problem_to_weights[b] says which row problem b uses.
    """
    A_PM = spec.design(logx_NC)  # M = J*N
    J, N = len(spec.terms), len(logy_N)
    shared = weights_RN.shape[0] == 1

    def fun(theta_BP, rows):
        W_BN = weights_RN[0] if shared else weights_RN[problem_to_weights[rows]]
        T_BJN = (theta_BP @ A_PM).reshape(-1, J, N)
        m_BN = T_BJN.max(axis=1)
        E_BJN = np.exp(T_BJN - m_BN[:, None])
        Z_BN = E_BJN.sum(axis=1)
        r_BN = m_BN + np.log(Z_BN) - logy_N
        c_BN = np.clip(r_BN, -delta, delta)  # dHuber/dr
        f_B = ((c_BN * (r_BN - 0.5 * c_BN)) * W_BN).sum(axis=1)
        E_BJN *= (W_BN * c_BN / Z_BN)[:, None]  # dobjective/dterm_j per point
        return f_B, E_BJN.reshape(len(theta_BP), -1) @ A_PM.T

    return fun


def grid(**axes: tuple[float, ...] | list[float]) -> dict[str, np.ndarray]:
    """Cartesian product of named axes, as columns (name -> values), for `starts_matrix`."""
    names = list(axes)
    rows = np.array(list(itertools.product(*(axes[n] for n in names))), dtype=np.float64)
    return {n: rows[:, i] for i, n in enumerate(names)}


def starts_matrix(spec: LawSpec, columns: dict[str, np.ndarray]) -> np.ndarray:
    """(S, P) starts in the spec's parameter order from named grid columns."""
    missing = [p for p in spec.params if p not in columns]
    if missing:
        raise ValueError(f"grid for law {spec.name!r} lacks axes {missing}; needs {list(spec.params)}")
    return np.stack([columns[p] for p in spec.params], axis=1)
