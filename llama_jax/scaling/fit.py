"""Scaling-law fits, pure NumPy/SciPy (no plotting, no I/O): IsoFLOP parabolas, power laws with bootstrap
intervals, and the two-step downstream forecast (Llama 3 §3.2.1).

* `isoflop_minima(runs)`: per budget (`flops`), loss = a·u² + b·u + c with u = ln(tokens) (least squares); the
  minimum u* = -b / 2a gives `tokens` = exp(u*) and `loss` = c - b² / 4a; `params` at the minimum comes from the
  least-squares line of ln(params) against ln(tokens) among the budget's runs (exact when C = 6·N·D).
  A budget with fewer than 3 distinct token counts, or whose parabola opens downward (a <= 0), is reported by
  budget with a warning and left out; if every budget is left out, a ValueError says why for each.
* `power_law(flops, values) -> (A, alpha)`: values = A · flops^alpha, least squares of ln(values) on ln(flops).
  `power_law_bootstrap` gives percentile intervals from resampled (flops, value) pairs; `isoflop_bootstrap`
  resamples runs within each budget and refits the minima and both power laws (the intervals the report uses).
* Downstream, two steps: `linear_fit(log10 flops, nll)` of the compute-optimal models' normalized NLL of the
  correct answer, then `sigmoid_fit(nll, accuracy)`: acc = chance + (1 - chance) / (1 + exp(k·(nll - x0))).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

_KEYS = ("flops", "params", "tokens", "loss")


class ScalingFitWarning(UserWarning):
    """A budget or run was left out of a fit (the message says which and why)."""


def _budget_key(flops: float) -> float:
    return float(f"{float(flops):.6g}")  # runs of one budget may carry its value with rounding noise


def group_by_budget(runs: Iterable[Mapping[str, Any]]) -> dict[float, list[dict]]:
    """Runs with the four keys and finite positive values, grouped by budget (ascending); others warned about."""
    groups: dict[float, list[dict]] = {}
    for i, r in enumerate(runs):
        missing = [k for k in _KEYS if k not in r]
        if missing:
            raise ValueError(f"run {r.get('name', i)!r} lacks {missing}; each run needs {list(_KEYS)}")
        vals = {k: float(r[k]) for k in _KEYS}
        if not all(math.isfinite(v) for v in vals.values()) or min(vals["flops"], vals["params"],
                                                                    vals["tokens"]) <= 0:
            warnings.warn(f"run {r.get('name', i)!r} has non-finite or non-positive values {vals}; left out",
                          ScalingFitWarning, stacklevel=2)
            continue
        groups.setdefault(_budget_key(vals["flops"]), []).append({**r, **vals})
    return dict(sorted(groups.items()))


def fit_parabola(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """(a, b, c) of the least-squares y = a·x² + b·x + c."""
    a, b, c = np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), 2)
    return float(a), float(b), float(c)


def budget_minimum(group: Sequence[Mapping[str, Any]]) -> tuple[dict | None, str]:
    """The minimum of one budget's IsoFLOP curve, or (None, why it is degenerate)."""
    flops = group[0]["flops"]
    u = np.log([float(r["tokens"]) for r in group])
    if len(np.unique(u)) < 3:
        return None, f"budget {flops:.3g} FLOPs: {len(np.unique(u))} distinct token counts; a parabola needs 3"
    loss = np.asarray([float(r["loss"]) for r in group])
    a, b, c = fit_parabola(u, loss)
    scale = max(float(np.ptp(loss)), 1e-12) / max(float(np.ptp(u)) ** 2, 1e-12)
    if not a > 1e-9 * scale:
        return None, (f"budget {flops:.3g} FLOPs: the parabola of loss in ln(tokens) opens downward or is flat "
                      f"(a = {a:.3g}); no minimum")
    u_min = -b / (2 * a)
    slope, icpt = np.polyfit(u, np.log([float(r["params"]) for r in group]), 1)
    out = {"flops": float(flops), "tokens": float(math.exp(u_min)), "params": float(math.exp(icpt + slope * u_min)),
           "loss": float(c - b * b / (4 * a))}
    if not u.min() <= u_min <= u.max():
        return out, (f"budget {flops:.3g} FLOPs: the minimum ({out['tokens']:.3g} tokens) lies outside the sampled "
                     f"range {math.exp(u.min()):.3g}-{math.exp(u.max()):.3g}; extrapolated")
    return out, ""


def isoflop_minima(runs: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Per budget, the minimum {"flops", "tokens", "params", "loss"} of its parabola, sorted by flops."""
    groups = group_by_budget(runs)
    if not groups:
        raise ValueError("no runs to fit")
    minima, problems = [], []
    for group in groups.values():
        m, why = budget_minimum(group)
        if m is None:
            problems.append(why)
            warnings.warn(why + "; budget left out", ScalingFitWarning, stacklevel=2)
            continue
        if why:
            warnings.warn(why, ScalingFitWarning, stacklevel=2)
        minima.append(m)
    if not minima:
        raise ValueError("every budget is degenerate, no IsoFLOP minimum to fit: " + "; ".join(problems))
    return minima


def _loglog(flops, values) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(flops, np.float64).ravel(), np.asarray(values, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"power_law: {x.size} flops but {y.size} values")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("power_law: flops and values must be finite and positive")
    if len(np.unique(x)) < 2:
        raise ValueError(f"power_law: needs at least 2 distinct compute budgets, got {len(np.unique(x))}")
    return np.log(x), np.log(y)


def power_law(flops: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """(A, alpha) with values = A · flops^alpha, least squares in log space."""
    log_a, alpha = _log_power_law(flops, values)
    return _exp(log_a), float(alpha)


def _log_power_law(flops, values) -> tuple[float, float]:
    """(ln A, alpha) of `power_law`."""
    lx, ly = _loglog(flops, values)
    alpha, log_a = np.polyfit(lx, ly, 1)
    return float(log_a), float(alpha)


def _exp(x: float) -> float:
    """e^x, inf past float64's range (an extreme bootstrap refit must not abort the report)."""
    return math.exp(x) if x < 709.0 else math.inf


def power_law_bootstrap(flops: Sequence[float], values: Sequence[float], n: int = 2000, level: float = 0.95,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals {"A": (lo, hi), "alpha": (lo, hi)} of `power_law`, resampling the
    (flops, value) pairs with replacement (resamples with fewer than 2 distinct budgets are redrawn)."""
    lx, ly = _loglog(flops, values)
    rng = np.random.default_rng(seed)
    fits = []
    while len(fits) < n:
        idx = rng.integers(0, len(lx), len(lx))
        if len(np.unique(lx[idx])) < 2:
            continue
        alpha, log_a = np.polyfit(lx[idx], ly[idx], 1)
        fits.append((math.exp(log_a), alpha))
    return _intervals(np.asarray(fits), ("A", "alpha"), level)


def _intervals(samples: np.ndarray, names: Sequence[str], level: float) -> dict[str, tuple[float, float]]:
    q = (1 - level) / 2
    return {k: (float(np.quantile(samples[:, i], q)), float(np.quantile(samples[:, i], 1 - q)))
            for i, k in enumerate(names)}


def forecast(a: float, alpha: float, flops: float) -> float:
    return float(a * flops ** alpha)


def isoflop_bootstrap(runs: Iterable[Mapping[str, Any]], n: int = 1000, level: float = 0.95, seed: int = 0,
                      targets: Sequence[float] = ()) -> dict[str, Any]:
    """Intervals from resampling runs with replacement within each budget and refitting everything.

    Returns {"tokens": {"A", "alpha"}, "params": {"A", "alpha"}, "forecast_tokens": {target: (lo, hi)},
    "forecast_params": {...}, "samples": kept resamples}; a resample whose minima cover fewer than 2 budgets is
    skipped (counted in "samples" against n).
    """
    groups = list(group_by_budget(runs).values())
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        minima = []
        for g in groups:
            m, _why = budget_minimum([g[j] for j in rng.integers(0, len(g), len(g))])
            if m is not None:
                minima.append(m)
        if len({m["flops"] for m in minima}) < 2:
            continue
        f = [m["flops"] for m in minima]
        lat, alt = _log_power_law(f, [m["tokens"] for m in minima])
        lap, alp = _log_power_law(f, [m["params"] for m in minima])
        # A and the forecasts are kept as logarithms (a resample's minimum can be extrapolated far enough that
        # A leaves float64's range); their percentiles are taken there and mapped back (exp is monotone)
        rows.append([lat, alt, lap, alp] + [lat + alt * math.log(t) for t in targets]
                    + [lap + alp * math.log(t) for t in targets])
    if not rows:
        raise ValueError("no bootstrap resample had minima at 2 or more budgets")
    s = np.asarray(rows)
    q = (1 - level) / 2
    iv = lambda col: (float(np.quantile(s[:, col], q)), float(np.quantile(s[:, col], 1 - q)))  # noqa: E731
    ev = lambda col: tuple(_exp(v) for v in iv(col))  # noqa: E731
    k = len(targets)
    return {"tokens": {"A": ev(0), "alpha": iv(1)}, "params": {"A": ev(2), "alpha": iv(3)},
            "forecast_tokens": {t: ev(4 + i) for i, t in enumerate(targets)},
            "forecast_params": {t: ev(4 + k + i) for i, t in enumerate(targets)}, "samples": len(rows)}


# ---------------------------------------------------------------------------------------- downstream

def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line y = slope·x + intercept."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size != y.size or len(np.unique(x)) < 2:
        raise ValueError(f"linear_fit needs at least 2 distinct x values with one y each, got {x.size}/{y.size}")
    slope, icpt = np.polyfit(x, y, 1)
    return float(slope), float(icpt)


def sigmoid(nll, k: float, x0: float, chance: float = 0.25):
    """Accuracy from normalized NLL: chance + (1 - chance) / (1 + exp(k·(nll - x0))) (k > 0: lower NLL, better)."""
    z = np.clip(k * (np.asarray(nll, np.float64) - x0), -500, 500)
    return chance + (1.0 - chance) / (1.0 + np.exp(z))


def sigmoid_fit(nll: Sequence[float], accuracy: Sequence[float], chance: float = 0.25) -> tuple[float, float]:
    """(k, x0) of `sigmoid` by least squares (scipy.optimize.curve_fit), from a logit-linear starting point."""
    from scipy import optimize  # noqa: PLC0415

    x, y = np.asarray(nll, np.float64), np.asarray(accuracy, np.float64)
    if x.size != y.size or x.size < 2 or len(np.unique(x)) < 2:
        raise ValueError(f"sigmoid_fit needs at least 2 distinct NLL values with one accuracy each, got {x.size}")
    p = np.clip((y - chance) / (1 - chance), 1e-3, 1 - 1e-3)
    slope, icpt = np.polyfit(x, np.log((1 - p) / p), 1)  # logit: ln((1-p)/p) = k·nll - k·x0
    k0 = slope if slope > 0 else 1.0
    x0 = -icpt / k0 if slope > 0 else float(np.median(x))
    try:
        (k, x0), _ = optimize.curve_fit(lambda v, k, x0: sigmoid(v, k, x0, chance), x, y, p0=(k0, x0),
                                        maxfev=20000)
    except (RuntimeError, optimize.OptimizeWarning) as e:
        raise ValueError(f"sigmoid_fit did not converge: {e}") from e
    return float(k), float(x0)


def downstream_points(runs: Iterable[Mapping[str, Any]], minima: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Per budget with a minimum, the normalized NLL (`mc_nll`) of its compute-optimal model: the quadratic of
    mc_nll in ln(tokens) among the budget's runs, evaluated at the loss minimum's tokens (clamped to the
    sampled range)."""
    groups = group_by_budget(r for r in runs if "mc_nll" in r and math.isfinite(float(r["mc_nll"])))
    out = []
    for m in minima:
        g = groups.get(_budget_key(m["flops"]))
        if not g or len({r["tokens"] for r in g}) < 3:
            continue
        u = np.log([r["tokens"] for r in g])
        u_star = min(max(math.log(m["tokens"]), u.min()), u.max())
        a, b, c = fit_parabola(u, [float(r["mc_nll"]) for r in g])
        out.append({"flops": m["flops"], "mc_nll": float(a * u_star ** 2 + b * u_star + c)})
    return out
