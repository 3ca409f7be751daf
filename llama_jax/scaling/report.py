"""Re-fits a sweep from its recorded runs and writes the report and plots (`python -m llama_jax.scaling fit`).

Reads `<workdir>/runs.jsonl` (runs with `status` other than "ok" are left out and listed), `sweep.json`
(the forecast target) and, when given, an anchors file: models beyond the sweep (the paper adds Llama 2 models)
whose (FLOPs, NLL, accuracy) join the sweep's runs in the downstream forecast's second step, the sigmoid from
NLL to accuracy (not the first, the line of compute-optimal NLL in FLOPs); `read_anchors` gives its format. It
writes into the workdir:
  fit.json   minima per budget, power laws (tokens and params) with bootstrap intervals, forecasts, downstream
  fit.txt    the same in a few lines
  plots/isoflop.png, plots/power_laws.png, plots/downstream.png
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Any

from llama_jax.scaling import fit
from llama_jax.scaling import sweep as sweep_lib

PAPER = {"tokens": (0.299, 0.537)}  # Llama 3 Figure 3 legend: N*(C) = A·C^alpha, N* in tokens
PAPER_FLOPS = 3.8e25
CHANCE = 0.25


def _read(workdir: str) -> tuple[list[dict], dict]:
    path = sweep_lib.runs_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no runs file {path!r}: run the sweep first (python -m llama_jax.main "
                                f"--config=experiments/scaling_laws.py:cpu --workdir={workdir})")
    runs = sweep_lib.read_runs(workdir, numbers=fit._KEYS)  # pylint: disable=protected-access
    sweep_path = os.path.join(workdir, sweep_lib.SWEEP_FILE)
    sweep = {}
    if os.path.exists(sweep_path):
        with open(sweep_path, encoding="utf-8") as f:
            try:
                sweep = json.load(f)
            except ValueError as e:
                raise ValueError(f"{sweep_path}: not valid JSON ({e})") from None
        if not isinstance(sweep, dict):
            raise ValueError(f"{sweep_path}: expected a JSON object, got {type(sweep).__name__}")
    return runs, sweep


ANCHOR_COLUMNS = ("flops", "nll", "accuracy")


def read_anchors(path: str) -> list[dict]:
    """The rows of an anchors file: CSV with a header naming at least the columns `flops`, `nll` (normalized NLL
    of the correct choice, nats per character, on the sweep's multiple-choice set) and `accuracy` (on the same
    set), in any order, and optionally `name`; one model per row, blank lines skipped. Each row becomes
    `{"name", "flops", "mc_nll", "mc_acc"}`. A malformed file (missing, no header or a header without those
    columns, a row of another width, a value that is not a finite number, FLOPs <= 0, NLL < 0, accuracy outside
    [0, 1], no rows) is a ValueError naming the file and the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--anchors={path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        try:
            rows = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise ValueError(f"{path}: not a CSV file ({e})") from None
    numbered = [(number, row) for number, row in enumerate(rows, 1) if any(cell.strip() for cell in row)]
    if not numbered:
        raise ValueError(f"{path}: empty; expected a header {','.join(ANCHOR_COLUMNS)} and one row per model")
    header_line, header = numbered[0]
    header = [cell.strip().lower() for cell in header]
    missing = [c for c in ANCHOR_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}, line {header_line}: the header {','.join(header)} lacks column(s) "
                         f"{', '.join(missing)}; expected {','.join(ANCHOR_COLUMNS)}[,name]")
    anchors = []
    for number, row in numbered[1:]:
        if len(row) != len(header):
            raise ValueError(f"{path}, line {number}: {len(row)} values for the header's {len(header)} columns")
        cells = dict(zip(header, (cell.strip() for cell in row)))
        try:
            values = {c: float(cells[c]) for c in ANCHOR_COLUMNS}
        except ValueError:
            raise ValueError(f"{path}, line {number}: {', '.join(f'{c}={cells[c]!r}' for c in ANCHOR_COLUMNS)}: "
                             "each must be a number") from None
        flops, nll, acc = (values[c] for c in ANCHOR_COLUMNS)
        if not all(math.isfinite(v) for v in values.values()) or flops <= 0 or nll < 0 or not 0 <= acc <= 1:
            raise ValueError(f"{path}, line {number}: flops={cells['flops']}, nll={cells['nll']}, accuracy="
                             f"{cells['accuracy']}: need finite flops > 0, nll >= 0 and accuracy in [0, 1]")
        anchors.append({"name": cells.get("name") or f"line {number}", "flops": flops, "mc_nll": nll,
                        "mc_acc": acc})
    if not anchors:
        raise ValueError(f"{path}: a header but no rows; expected one row per model")
    return anchors


def fit_workdir(workdir: str, forecast_flops: float = 0.0, bootstrap: int = 1000, seed: int = 0,
                anchors: str = "") -> dict[str, Any]:
    """Fits the runs recorded in `workdir` (and, in the sigmoid, the models of the `anchors` file, if any),
    writes fit.json, fit.txt and plots/; returns the report."""
    anchor_rows = read_anchors(anchors) if anchors else []
    runs, sweep = _read(workdir)
    ok = [r for r in runs if r.get("status", "ok") == "ok"]
    failed = [r.get("name", "?") for r in runs if r.get("status", "ok") != "ok"]
    target = float(forecast_flops or sweep.get("forecast_flops") or PAPER_FLOPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fit.ScalingFitWarning)
        minima = fit.isoflop_minima(ok)
        groups = fit.group_by_budget(ok)
    notes = sorted({str(w.message) for w in caught if issubclass(w.category, fit.ScalingFitWarning)})
    report: dict[str, Any] = {"runs": len(runs), "runs_fitted": len(ok), "failed_runs": failed, "warnings": notes,
                              "minima": minima, "forecast_flops": target}
    flops = [m["flops"] for m in minima]
    if len(minima) >= 2:
        for key in ("tokens", "params"):
            a, alpha = fit.power_law(flops, [m[key] for m in minima])
            report[key] = {"A": a, "alpha": alpha, "forecast": fit.forecast(a, alpha, target)}
        if bootstrap:
            b = fit.isoflop_bootstrap(ok, n=bootstrap, seed=seed, targets=[target])
            for key in ("tokens", "params"):
                report[key]["interval_95"] = {**b[key], "forecast": b[f"forecast_{key}"][target]}
            report["bootstrap_resamples"] = b["samples"]
    else:
        report["power_law_skipped"] = f"minima at {len(minima)} budget(s); a power law needs 2"
    a, alpha = PAPER["tokens"]
    report["paper"] = {"tokens": {"A": a, "alpha": alpha, "forecast_flops": PAPER_FLOPS,
                                  "forecast": fit.forecast(a, alpha, PAPER_FLOPS)}}
    report["downstream"] = _downstream(ok, minima, target, anchor_rows)
    if anchors:
        report["downstream"]["anchors_file"] = os.path.abspath(anchors)
    _write(workdir, report, groups, minima, target)
    return report


def _downstream(runs: list[dict], minima: list[dict], target: float, anchors: list[dict]) -> dict[str, Any]:
    scored = [r for r in runs if "mc_nll" in r and "mc_acc" in r and math.isfinite(r["mc_nll"])]
    points = fit.downstream_points(scored, minima)
    out: dict[str, Any] = {"points": points, "chance": CHANCE, "anchors": anchors}
    if len(points) >= 2:
        slope, icpt = fit.linear_fit([math.log10(p["flops"]) for p in points], [p["mc_nll"] for p in points])
        out["nll_line"] = {"slope_per_decade": slope, "intercept": icpt}
        out["forecast"] = {"flops": target, "mc_nll": slope * math.log10(target) + icpt}
    else:
        out["nll_line_skipped"] = f"{len(points)} compute-optimal NLL point(s); a line needs 2"
    try:
        sigmoid_points = scored + anchors  # step 2 only: the anchors are not compute-optimal sweep models
        k, x0 = fit.sigmoid_fit([r["mc_nll"] for r in sigmoid_points], [r["mc_acc"] for r in sigmoid_points],
                                CHANCE)
        out["sigmoid"] = {"k": k, "x0": x0, "runs": len(scored), "anchors": len(anchors)}
        if "forecast" in out:
            out["forecast"]["mc_acc"] = float(fit.sigmoid(out["forecast"]["mc_nll"], k, x0, CHANCE))
    except ValueError as e:
        out["sigmoid_skipped"] = str(e)
    return out


def _write(workdir: str, report: dict, groups, minima, target: float) -> None:
    from llama_jax.scaling import plots  # noqa: PLC0415 - matplotlib only when writing plots

    pdir = os.path.join(workdir, "plots")
    os.makedirs(pdir, exist_ok=True)
    parabolas = {}
    for flops, g in groups.items():
        if len({r["tokens"] for r in g}) >= 3:
            parabolas[flops] = fit.fit_parabola([math.log(r["tokens"]) for r in g], [r["loss"] for r in g])
    plots.isoflop_curves(os.path.join(pdir, "isoflop.png"), groups, parabolas, minima)
    if "tokens" in report:
        plots.power_laws(os.path.join(pdir, "power_laws.png"), minima,
                         {k: (report[k]["A"], report[k]["alpha"]) for k in ("tokens", "params")}, target,
                         reference=PAPER)
    d = report["downstream"]
    scored = [r for g in groups.values() for r in g if "mc_nll" in r and "mc_acc" in r]
    if scored or d["anchors"]:
        sig = (d["sigmoid"]["k"], d["sigmoid"]["x0"]) if "sigmoid" in d else None
        line = (d["nll_line"]["slope_per_decade"], d["nll_line"]["intercept"]) if "nll_line" in d else None
        plots.downstream(os.path.join(pdir, "downstream.png"), d["points"], line, scored, sig, CHANCE,
                         d.get("forecast") if sig is not None else None, anchors=d["anchors"])
    tmp = os.path.join(workdir, "fit.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(workdir, "fit.json"))
    with open(os.path.join(workdir, "fit.txt"), "w") as f:
        f.write(summary(report) + "\n")


def summary(report: dict) -> str:
    """The report in a few lines."""
    lines = [f"runs: {report['runs_fitted']} fitted of {report['runs']}"
             + (f"; failed (left out): {', '.join(report['failed_runs'])}" if report["failed_runs"] else "")]
    lines += [f"warning: {w}" for w in report["warnings"]]
    for m in report["minima"]:
        lines.append(f"budget {m['flops']:.3g} FLOPs: optimum {m['tokens']:.4g} tokens, {m['params']:.4g} params, "
                     f"loss {m['loss']:.4f}")
    target = report["forecast_flops"]
    for key in ("tokens", "params"):
        if key in report:
            r = report[key]
            line = f"{key}: N*(C) = {r['A']:.4g} * C^{r['alpha']:.4f}; at {target:.3g} FLOPs: {r['forecast']:.4g}"
            if "interval_95" in r:
                iv = r["interval_95"]
                line += (f"  [95% bootstrap: alpha {iv['alpha'][0]:.4f}-{iv['alpha'][1]:.4f}, A {iv['A'][0]:.4g}-"
                         f"{iv['A'][1]:.4g}, forecast {iv['forecast'][0]:.4g}-{iv['forecast'][1]:.4g}]")
            lines.append(line)
    if "power_law_skipped" in report:
        lines.append(f"power laws skipped: {report['power_law_skipped']}")
    p = report["paper"]["tokens"]
    lines.append(f"Llama 3 (paper): tokens N*(C) = {p['A']} * C^{p['alpha']}; at {p['forecast_flops']:.2g} FLOPs: "
                 f"{p['forecast']:.4g} tokens")
    d = report["downstream"]
    if "nll_line" in d:
        lines.append(f"downstream step 1: mc_nll = {d['nll_line']['slope_per_decade']:.4f} * log10(C) + "
                     f"{d['nll_line']['intercept']:.4f} ({len(d['points'])} compute-optimal points)")
    if "sigmoid" in d:
        fitted = f"{d['sigmoid']['runs']} runs" + (f" + {d['sigmoid']['anchors']} anchors from "
                                                     f"{d['anchors_file']}" if d["sigmoid"]["anchors"] else "")
        lines.append(f"downstream step 2: acc = 0.25 + 0.75 / (1 + exp({d['sigmoid']['k']:.4g} * (nll - "
                     f"{d['sigmoid']['x0']:.4g}))) ({fitted})")
    if "forecast" in d and "mc_acc" in d["forecast"]:
        lines.append(f"downstream forecast at {target:.3g} FLOPs: mc_nll {d['forecast']['mc_nll']:.4f}, "
                     f"accuracy {d['forecast']['mc_acc']:.3f}")
    for k in ("nll_line_skipped", "sigmoid_skipped"):
        if k in d:
            lines.append(f"downstream: {k.replace('_', ' ')}: {d[k]}")
    return "\n".join(lines)
