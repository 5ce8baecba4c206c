#!/usr/bin/env bash
# Re-render the checked-in job chains from the code, the site file and the recipes; run it from
# anywhere after changing any of them (tests/test_jobs.py fails until the files match again).
#
#   jobs/slurm/      reference cluster: 4 nodes x 8 A100, InfiniBand, Lustre, node-local NVMe
#                    staging (--stage), the LibriSpeech-100 recipe; env/site.yaml as shipped; the
#                    serve job on the separate inference nodes (partition/queue "inference")
#   jobs/pbs/        the same cluster under PBS Pro
#   jobs/slurm-cpu/  CPU-only partition (no GPUs: ranks pinned to cores), the demo recipe
#
# --portable: no absolute paths (the jobs run in the directory you submit from: a checkout, or a
# project directory holding the same relative paths); --no-path-check: the data is on the cluster,
# not here. Your own chain: the same command with your --config/--site and without those two.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
for dir in jobs/slurm jobs/pbs jobs/slurm-cpu; do rm -f "$dir"/*.sbatch "$dir"/*.pbs "$dir"/jobs.json; done
common=(--site env/site.yaml --portable --no-path-check)
"$PY" -m hpc_asr jobs render "${common[@]}" --scheduler slurm --nodes 4 --gpus-per-node 8 --stage \
  --serve-partition inference --config hpc_asr/configs/librispeech100.yaml --out jobs/slurm
"$PY" -m hpc_asr jobs render "${common[@]}" --scheduler pbs --nodes 4 --gpus-per-node 8 --stage \
  --serve-partition inference --config hpc_asr/configs/librispeech100.yaml --out jobs/pbs
"$PY" -m hpc_asr jobs render "${common[@]}" --scheduler slurm --nodes 4 --gpus-per-node 0 \
  --config hpc_asr/configs/demo.yaml --out jobs/slurm-cpu
