"""The cluster launch files: valid syntax, the exact command in each header, and the environment that
`llama_jax.sharding.distributed.initialize` reads."""

import pathlib
import subprocess

import pytest
import yaml

from llama_jax.sharding import distributed

LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch"


@pytest.mark.parametrize("name", ["slurm.sbatch", "tpu_vm.sh"])
def test_shell_scripts_parse_and_call_the_multihost_main(name):
    path = LAUNCH / name
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "python -m llama_jax.main --multihost" in text
    header = text.split("\nset -euo pipefail")[0]
    assert ("sbatch " if name.endswith(".sbatch") else "launch/tpu_vm.sh run ") in header  # the exact command


def test_jobset_gives_each_pod_its_process_id_and_the_coordinator():
    doc = yaml.safe_load((LAUNCH / "k8s_jobset.yaml").read_text())
    assert doc["kind"] == "JobSet"
    job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) >= {distributed.ENV_ADDRESS, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID}
    assert int(env[distributed.ENV_NUM_PROCESSES]["value"]) == job["parallelism"] == job["completions"]
    assert "job-completion-index" in env[distributed.ENV_PROCESS_ID]["valueFrom"]["fieldRef"]["fieldPath"]
    name, rjob = doc["metadata"]["name"], doc["spec"]["replicatedJobs"][0]["name"]
    assert env[distributed.ENV_ADDRESS]["value"].startswith(f"{name}-{rjob}-0-0.{name}:")
    assert container["command"][:4] == ["python", "-m", "llama_jax.main", "--multihost"]


def test_distributed_environment_errors_are_clear(monkeypatch):
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.delenv(distributed.ENV_PROCESS_ID, raising=False)
    with pytest.raises(ValueError, match="set both JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "x")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' is not an integer"):
        distributed.initialize()
