"""real-megatron: REAL (Rewards as Labels) RLVR training on Megatron-Core."""
from setuptools import find_packages, setup

# Core dependencies: everything the CPU path (tests, the demo) needs.
# torch==2.13.0 is pinned because it is the CPU wheel available on the development
# machines; any other version pulls a multi-GB CUDA build.
CORE = [
    "torch==2.13.0",
    "megatron-core==0.16.1",  # newest release that installs on Python 3.11
    "transformers==5.23.0",
    "tokenizers>=0.22,<0.24",
    "safetensors>=0.5",
    "pyarrow>=15",
    "numpy>=1.26",
    "pyyaml>=6",
    "math-verify==0.9.0",
    "nemo-run==0.11.1",
    "leptonai==0.27.3",  # newer leptonai breaks `import nemo_run`
    "wandb>=0.19",
    "psutil>=5.9",  # megatron-core's dist_checkpointing writer imports it
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

EXTRAS = {
    "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff==0.17.6"],  # ruff: the linter `make test` runs first
    # GPU extras: never installed on the CPU machines. NVIDIA Apex is NOT on PyPI
    # (PyPI's "apex" is an unrelated package); build it from NVIDIA's source if wanted.
    "gpu": ["transformer-engine[pytorch]", "sglang"],
}

setup(
    name="real-megatron",
    version="0.1.0",
    description="REAL (Rewards as Labels) policy optimisation for RLVR on Megatron-Core",
    packages=find_packages(include=["real_megatron", "real_megatron.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["real-megatron=real_megatron.cli:main"]},
)
