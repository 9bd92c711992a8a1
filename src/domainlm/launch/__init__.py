"""Running stages on a cluster: ``slurm`` (the sbatch script of `domainlm launch slurm`, the Slurm executor of
`domainlm prepare`, job states)."""
