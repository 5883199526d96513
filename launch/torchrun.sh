#!/usr/bin/env bash
# Launch training on this node with torchrun.
#   launch/torchrun.sh CONFIG [--set key=value ...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR (and MASTER_PORT) on every node.
# NPROC_PER_NODE defaults to the number of GPUs, or 1 without any.
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [--set key=value ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
# Config and input problems are reported here, one line each with exit code 2, before torchrun
# starts: from inside it they would come once per process, under torchrun's own traceback.
"$python" -m megatron_ibxl.cli train --config "$config" "$@" --dry-run --check-inputs \
  --world-size $(( ${NNODES:-1} * nproc )) > /dev/null || exit $?

# torchrun runs in a session of its own, so a terminal's Ctrl-C reaches only this script, which
# passes it on once (below); torchrun would otherwise take it as a reason to kill its workers.
detach=$(command -v setsid || true)
$detach "$python" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m megatron_ibxl.cli train --config "$config" "$@" &
launcher=$!

# SIGTERM or SIGUSR1 sent to this script (a scheduler's pre-emption notice, a `kill`) goes to
# the training processes, which finish the step, write a checkpoint and exit 0, so torchrun
# and this script exit 0 as well; so does Ctrl-C (SIGINT; pressed again a moment later, it
# aborts without a checkpoint) and a closed terminal (SIGHUP, passed on as SIGTERM). Sent to
# torchrun itself, SIGTERM would make it kill its workers without a checkpoint and exit 1.
forward() { pkill "-$1" -P "$launcher" || true; }
trap 'forward TERM' TERM HUP
trap 'forward USR1' USR1
trap 'forward INT' INT
set +e
while :; do
  wait "$launcher"
  rc=$?
  # A trapped signal interrupts `wait` with a status above 128 while torchrun still runs.
  if [ "$rc" -gt 128 ] && kill -0 "$launcher" 2>/dev/null; then continue; fi
  break
done
if [ "$rc" -gt 128 ]; then wait "$launcher"; rc=$?; fi
exit "$rc"
