"""Suite-wide setup: 8 virtual CPU devices (before jax is imported) so sharding tests can build
meshes, and float32 matmuls at full precision for parity with the PyTorch reference."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
