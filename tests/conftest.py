"""Test set-up: 8 simulated CPU devices for mesh tests (must happen before jax is imported), and
a persistent compilation cache for the session, so the many identical tiny models compile once."""

import os
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0"

flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The suite compiles hundreds of small programs and runs each a few times: without LLVM's
# optimization passes XLA's CPU compiles take a third less time (the HLO passes, which decide
# fusion, buffer reuse, in-place updates and what the tests inspect, all still run).
if "xla_backend_optimization_level" not in flags:
    flags += " " + FAST_COMPILE
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# libtpu (in the test extra) makes every JAX process try a TPU backend first; tests run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gptjax-test-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
