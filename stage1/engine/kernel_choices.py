"""The kernel choices (`LLM(kernels=...)`, `--kernels`), apart from backends.py, which imports torch: the CLI offers
them without loading it."""

CHOICES = ("auto", "torch", "triton", "native")
