"""PNG plots of a scaling-law fit (matplotlib, Agg backend; the fits come from `llama_jax.scaling.fit`)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415
    return pyplot


def isoflop_curves(path: str, groups: Mapping[float, Sequence[Mapping[str, Any]]],
                   parabolas: Mapping[float, tuple[float, float, float]], minima: Sequence[Mapping[str, Any]]) -> None:
    """Loss against training tokens per budget: the runs, their parabolas in ln(tokens) and the minima."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(groups), 1)))
    for color, (flops, runs) in zip(colors, groups.items()):
        t = np.asarray([r["tokens"] for r in runs])
        ax.scatter(t, [r["loss"] for r in runs], color=color, s=18, label=f"{flops:.0e} FLOPs")
        if flops in parabolas:
            a, b, c = parabolas[flops]
            at = [m["tokens"] for m in minima if m["flops"] == flops]  # reach an extrapolated minimum too
            u = np.linspace(np.log(min([t.min(), *at])) - 0.3, np.log(max([t.max(), *at])) + 0.3, 100)
            ax.plot(np.exp(u), a * u ** 2 + b * u + c, color=color, lw=1)
    if minima:
        ax.scatter([m["tokens"] for m in minima], [m["loss"] for m in minima], marker="*", s=120, color="red",
                   zorder=5, label="minima")
    ax.set(xscale="log", xlabel="training tokens", ylabel="held-out loss (nats/token)", title="IsoFLOP curves")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def power_laws(path: str, minima: Sequence[Mapping[str, Any]], fits: Mapping[str, tuple[float, float]],
               forecast_flops: float, reference: Mapping[str, tuple[float, float]] | None = None) -> None:
    """Compute-optimal tokens and params against FLOPs with the fitted power laws extrapolated to forecast_flops."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    f = np.asarray([m["flops"] for m in minima])
    grid = np.logspace(np.log10(f.min()) - 0.3, np.log10(max(forecast_flops, f.max())) + 0.1, 100)
    for ax, key in zip(axes, ("tokens", "params")):
        ax.scatter(f, [m[key] for m in minima], color="black", zorder=5, label="IsoFLOP minima")
        a, alpha = fits[key]
        ax.plot(grid, a * grid ** alpha, label=f"fit: {a:.3g} C^{alpha:.3f}")
        ax.scatter([forecast_flops], [a * forecast_flops ** alpha], marker="x", color="red", s=60,
                   label=f"{a * forecast_flops ** alpha:.3g} at {forecast_flops:.2g}")
        if reference and key in reference:
            ra, ralpha = reference[key]
            ax.plot(grid, ra * grid ** ralpha, ls="--", color="gray", label=f"Llama 3: {ra:.3g} C^{ralpha:.3f}")
        ax.set(xscale="log", yscale="log", xlabel="compute (FLOPs)", ylabel=f"compute-optimal {key}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def downstream(path: str, points: Sequence[Mapping[str, Any]], line: tuple[float, float] | None,
               runs: Sequence[Mapping[str, Any]], sig: tuple[float, float] | None, chance: float,
               forecast: Mapping[str, float] | None = None, anchors: Sequence[Mapping[str, Any]] = ()) -> None:
    """Left: normalized NLL of compute-optimal models against FLOPs with the linear fit (and the anchors, not in
    it). Right: accuracy against NLL for every run and anchor with the sigmoid."""
    from llama_jax.scaling import fit  # noqa: PLC0415

    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if points:
        f = np.asarray([p["flops"] for p in points])
        ax1.scatter(f, [p["mc_nll"] for p in points], color="black", label="compute-optimal models")
        if line is not None:
            hi = max(f.max(), forecast["flops"] if forecast else f.max())
            grid = np.logspace(np.log10(f.min()) - 0.2, np.log10(hi) + 0.1, 50)
            ax1.plot(grid, line[0] * np.log10(grid) + line[1], label=f"{line[0]:.3f} log10 C + {line[1]:.3f}")
        if forecast:
            ax1.scatter([forecast["flops"]], [forecast["mc_nll"]], marker="x", color="red", s=60, label="forecast")
    if anchors:
        ax1.scatter([a["flops"] for a in anchors], [a["mc_nll"] for a in anchors], marker="s", facecolors="none",
                    edgecolors="tab:blue", label="anchors (not in the line)")
    ax1.set(xscale="log", xlabel="compute (FLOPs)", ylabel="normalized NLL of the correct choice (nats/char)")
    ax1.legend(fontsize=7)
    x = np.asarray([r["mc_nll"] for r in [*runs, *anchors]])
    ax2.scatter([r["mc_nll"] for r in runs], [r["mc_acc"] for r in runs], s=14, color="black", label="runs")
    if anchors:
        ax2.scatter([a["mc_nll"] for a in anchors], [a["mc_acc"] for a in anchors], marker="s",
                    facecolors="none", edgecolors="tab:blue", label="anchors")
    if sig is not None and x.size:
        grid = np.linspace(min(x.min(), forecast["mc_nll"] if forecast else x.min()) - 0.05, x.max() + 0.05, 100)
        ax2.plot(grid, fit.sigmoid(grid, *sig, chance=chance), label=f"sigmoid k={sig[0]:.3g}, x0={sig[1]:.3g}")
    if forecast:
        ax2.scatter([forecast["mc_nll"]], [forecast["mc_acc"]], marker="x", color="red", s=60, label="forecast")
    ax2.axhline(chance, ls=":", color="gray")
    ax2.set(xlabel="normalized NLL of the correct choice (nats/char)", ylabel="accuracy (4 choices)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
