"""A test-only project: a noisy regression small enough to prove the runner's mechanics in seconds
(DDP, sweeps, SLURM preset, exact resume, NaN guard, logging). It is not a paper and never listed as one."""
