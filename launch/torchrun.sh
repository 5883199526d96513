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
exec "$python" -m torch.distributed.run \
  --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m megatron_ibxl.cli train --config "$config" "$@"
