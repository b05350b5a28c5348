from setuptools import setup

setup(
    name="gesr-kernels",
    version="0.1.0",
    description="Fused Triton GPU kernels for Generative Early Stage Ranking: hard-match attention "
                "and target-aware attention, with pure-PyTorch references.",
    packages=["gesr_kernels", "gesr_kernels._core", "reference", "bench"],
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "triton>=3.6"],
    extras_require={"test": ["pytest>=8", "numpy"], "bench": ["pytest-benchmark"]},
)
