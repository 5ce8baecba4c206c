"""Operations: SLURM/PBS jobs, node-local staging, the doctor."""
