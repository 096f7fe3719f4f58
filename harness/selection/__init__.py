"""What to run: cases, the matrix, the run's options, shards, workloads."""
