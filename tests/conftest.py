"""Suite-wide setup: 8 virtual CPU devices (before jax is imported) so sharding tests can build
meshes, float32 matmuls at full precision for parity with the PyTorch reference, and one
persistent compilation cache for the whole run (and the commands it starts as subprocesses):
many tests build a fresh trainer or model whose jitted functions lower to HLO that an earlier
test already compiled, and on 2 cores compiling is most of their time."""

import os
import shutil
import tempfile

# Tests compile far more than they compute (tiny models): with LLVM's optimisations off XLA:CPU compiles in about
# two thirds of the time (tests/test_sampling.py + tests/memory/test_streaming.py: 108 s -> 77 s on 2 cores), and
# every tolerance holds either way. Subprocesses the tests start inherit it (multiprocess_train.with_device_count).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Suite run 628 s -> 486 s on 2 cores. A cache made here lives for this run only.
_RUN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _RUN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxgrounding-tests-jit-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
    if _RUN_CACHE:
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)
