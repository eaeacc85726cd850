"""dpray benchmarks: each measures a ratio against a baseline in the same run."""
