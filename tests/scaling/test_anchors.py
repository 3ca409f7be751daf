"""Anchor models beyond the sweep (`fit --anchors=FILE`): they join the sigmoid from NLL to accuracy, not the
line of compute-optimal NLL in FLOPs, and a malformed file is one line naming the file and the line."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from llama_jax.scaling import fit, report, sweep

REPO = pathlib.Path(__file__).resolve().parents[2]
K, X0 = 4.0, 1.5  # the sigmoid the synthetic models follow


def _runs(mc_nll: float) -> list[dict]:
    """3 budgets x 3 sizes, loss a parabola in ln(tokens) with its minimum at 1e3 x C^0.5 tokens; every run has the
    same multiple-choice NLL (so the sweep alone cannot fit a sigmoid) and the accuracy the sigmoid gives it."""
    runs = []
    for flops in (1e18, 1e19, 1e20):
        best = 1e3 * math.sqrt(flops)
        for ratio in (0.25, 1.0, 4.0):
            tokens = best * ratio
            runs.append(dict(name=f"c{flops:g}_{ratio}", flops=flops, tokens=tokens, params=flops / (6 * tokens),
                             loss=3.0 + math.log(ratio) ** 2, mc_nll=mc_nll,
                             mc_acc=float(fit.sigmoid(mc_nll, K, X0)), status="ok"))
    return runs


def test_anchors_join_only_the_sigmoid_and_give_back_its_parameters(tmp_path):
    sweep.write_runs(str(tmp_path), _runs(2.0))
    alone = report.fit_workdir(str(tmp_path), forecast_flops=1e22, bootstrap=0)["downstream"]
    assert "2 distinct NLL values" in alone["sigmoid_skipped"] and alone["anchors"] == []
    anchors = tmp_path / "llama2.csv"
    rows = [("small", 1e22, 1.2), ("medium", 1e23, 0.9), ("large", 1e24, 0.6)]
    anchors.write_text("name,flops,nll,accuracy\n" + "".join(
        f"{name},{flops:g},{nll},{float(fit.sigmoid(nll, K, X0))!r}\n" for name, flops, nll in rows))
    with_anchors = report.fit_workdir(str(tmp_path), forecast_flops=1e22, bootstrap=0, anchors=str(anchors))
    d = with_anchors["downstream"]
    assert (d["sigmoid"]["k"], d["sigmoid"]["x0"]) == (pytest.approx(K, rel=1e-4), pytest.approx(X0, rel=1e-4))
    assert (d["sigmoid"]["runs"], d["sigmoid"]["anchors"]) == (9, 3)
    assert [a["name"] for a in d["anchors"]] == ["small", "medium", "large"]
    assert d["nll_line"] == alone["nll_line"]  # step 1 fits the sweep's compute-optimal models only
    assert d["nll_line"]["slope_per_decade"] == pytest.approx(0.0, abs=1e-9)
    assert d["forecast"]["mc_acc"] == pytest.approx(float(fit.sigmoid(2.0, K, X0)), rel=1e-4)
    assert "9 runs + 3 anchors from" in (tmp_path / "fit.txt").read_text()
    assert json.loads((tmp_path / "fit.json").read_text())["downstream"]["anchors_file"] == str(anchors)


@pytest.mark.parametrize("text,want", [
    ("", "empty; expected a header flops,nll,accuracy"),
    ("flops,loss,accuracy\n1e20,1.0,0.5\n", "line 1: the header flops,loss,accuracy lacks column(s) nll"),
    ("flops,nll,accuracy\n", "a header but no rows"),
    ("flops,nll,accuracy\n1e20,1.0,0.5\n1e21,0.9\n", "line 3: 2 values for the header's 3 columns"),
    ("flops,nll,accuracy\n1e20,one,0.5\n", "line 2: flops='1e20', nll='one', accuracy='0.5': each must be a number"),
    ("nll,accuracy,flops\n\n1.0,1.5,1e20\n", "line 3: flops=1e20, nll=1.0, accuracy=1.5: need finite flops > 0"),
    ("flops,nll,accuracy\n-1,1.0,0.5\n", "line 2: flops=-1, nll=1.0, accuracy=0.5: need finite flops > 0"),
    ("flops,nll,accuracy\n1e20,nan,0.5\n", "line 2: flops=1e20, nll=nan, accuracy=0.5: need finite"),
])
def test_a_malformed_anchors_file_is_named_with_its_line(tmp_path, text, want):
    path = tmp_path / "anchors.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        report.read_anchors(str(path))
    assert str(error.value).startswith((f"{path}: {want}", f"{path}, {want}")), error.value


def test_fit_command_reports_a_bad_anchors_file_in_one_line(tmp_path):
    sweep.write_runs(str(tmp_path), _runs(2.0))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for anchors, want in [(tmp_path / "missing.csv", f"--anchors={tmp_path / 'missing.csv'}: no such file"),
                          (tmp_path / "bad.csv", f"{tmp_path / 'bad.csv'}, line 2: 2 values for the header's 3")]:
        if anchors.name == "bad.csv":
            anchors.write_text("flops,nll,accuracy\n1e20,1.0\n")
        p = subprocess.run([sys.executable, "-m", "llama_jax.scaling", "fit", f"--workdir={tmp_path}",
                            f"--anchors={anchors}"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-2000:]
        assert p.stderr.startswith(f"llama_jax: error: {want}"), p.stderr
    assert not (tmp_path / "fit.json").exists()  # nothing written
