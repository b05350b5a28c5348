"""Microbenchmarks of gesr_kernels against what a user would write instead. Run ``python -m bench``."""
