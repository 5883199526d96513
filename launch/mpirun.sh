#!/usr/bin/env bash
# Launch training with mpirun (Open MPI from the venv, or the system's).
#   NP=16 HOSTFILE=hosts launch/mpirun.sh CONFIG [--set key=value ...]
# Rank 0's host becomes the rendezvous unless MASTER_ADDR is set.
set -euo pipefail
config=${1:?usage: NP=N launch/mpirun.sh CONFIG [--set key=value ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
mpirun_bin=${MPIRUN:-$(dirname "$python")/mpirun}
[ -x "$mpirun_bin" ] || mpirun_bin=mpirun
extra=()
[ "$(id -u)" = 0 ] && extra+=(--allow-run-as-root)
[ -n "${HOSTFILE:-}" ] && extra+=(--hostfile "$HOSTFILE")
exec "$mpirun_bin" -np "${NP:-1}" --oversubscribe "${extra[@]}" \
  -x MASTER_PORT="${MASTER_PORT:-29500}" ${MASTER_ADDR:+-x MASTER_ADDR="$MASTER_ADDR"} \
  -x PATH ${PYTHONPATH:+-x PYTHONPATH} \
  "$python" -m megatron_ibxl.cli train --config "$config" "$@"
