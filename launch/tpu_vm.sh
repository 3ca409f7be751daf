#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: one process per TPU VM host, started on all hosts at once.
#
#   launch/tpu_vm.sh setup TPU_NAME ZONE                 # once: clone + install on every host
#   launch/tpu_vm.sh run TPU_NAME ZONE -- --config=experiments/pretrain.py:llama3.2-1b --workdir=/mnt/runs/1b
#
# `run` passes the llama_jax.main flags after `--` to every host with `--multihost`; jax.distributed.initialize()
# detects the pod from the TPU metadata (worker id, coordinator = worker 0). Needs: gcloud authenticated for the
# project, LLAMA_JAX_REPOSITORY (git URL of this repository; setup clones it to ~/llama_jax on each host), and a
# --workdir every host sees (a Filestore / NFS mount; Orbax writes one checkpoint from all hosts, process 0 writes
# logs and metrics). A host that fails ends the ssh session with a non-zero status; kill the others with
# `launch/tpu_vm.sh stop TPU_NAME ZONE`, then rerun `run` to resume from the last checkpoint.
set -euo pipefail
usage() { echo "usage: $0 setup|run|stop TPU_NAME ZONE [-- llama_jax.main flags]" >&2; exit 2; }
[ $# -ge 3 ] || usage
ACTION=$1 TPU=$2 ZONE=$3
shift 3
on_all_hosts() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
case "$ACTION" in
  setup)
    : "${LLAMA_JAX_REPOSITORY:?set LLAMA_JAX_REPOSITORY to the git URL of llama_jax}"
    on_all_hosts "set -e; [ -d ~/llama_jax ] || git clone --depth 1 $LLAMA_JAX_REPOSITORY ~/llama_jax; cd ~/llama_jax; \
python3 -m venv .venv; . .venv/bin/activate; pip install -q -r requirements.txt; \
pip install -q \"jax[tpu]==\$(python -c 'import jax; print(jax.__version__)')\"; pip install -q --no-deps -e ."
    ;;
  run)
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || usage
    printf -v FLAGS '%q ' "$@"
    on_all_hosts "cd ~/llama_jax && . .venv/bin/activate && python -m llama_jax.main --multihost $FLAGS"
    ;;
  stop)
    on_all_hosts "pkill -TERM -f 'llama_jax.main --multihost' || true"
    ;;
  *) usage ;;
esac
