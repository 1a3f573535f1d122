"""The ``gigassl extract`` batch job on a shared output folder: which slides a job owns (listing,
shards, per-slide claims), planning the next slides while one is encoded, the output layout,
the progress record and the end-of-run summary with its exit status. Many jobs (SLURM arrays,
torchrun ranks, restarts) may write one folder; this package keeps them from colliding.
"""
