#!/usr/bin/env bash
# Start one node of a multi-node torchrun job; run the same command on every machine.
#
#   examples/multinode.sh HOST:PORT JOB_ID SCRIPT [SCRIPT OPTIONS...]
#   examples/multinode.sh 10.0.0.1:29500 digits-sketch-1 examples/train_ddp.py --hook sketch
#
# HOST is the address of one of the machines (it runs torchrun's c10d rendezvous store), PORT a
# free port there, JOB_ID a name that is the same on every machine and new for every job.
# NNODES (default 2) machines join, each starting NPROC_PER_NODE (default 1) processes; the
# ranks are given in the order the machines join. PYTHON (default python) is the interpreter
# with torch and sketchcomm installed. See docs/integrations.md.
set -euo pipefail

if [ $# -lt 3 ]; then
    echo "usage: $0 HOST:PORT JOB_ID SCRIPT [SCRIPT OPTIONS...]" >&2
    exit 2
fi
endpoint=$1
job_id=$2
shift 2

exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-2}" --nproc_per_node="${NPROC_PER_NODE:-1}" \
    --rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id="$job_id" \
    "$@"
