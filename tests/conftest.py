"""Test environment: CPU only, offline, 8 simulated devices. Set before JAX or HF are imported."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
# Eight simulated devices share two cores: on a loaded machine a device thread can reach a
# collective long after the others, and XLA aborts the process after 40 s by default.
if "collective_call_terminate_timeout" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=300"
                                " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120")

# The tests' programs are tiny: compiling them costs more than running them, and LLVM's
# optimizations are most of the compile time (the six rule tests of test_step.py: 142 s -> 78 s
# without them). Results stay within every tolerance the tests check.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# No persistent compilation cache (JAX_COMPILATION_CACHE_DIR): with executables loaded from it,
# a train step on these simulated devices deadlocked, one device in the layer scan's all-gather
# and the other seven in an all-reduce: 5 of 16 resumed LoRA runs under load, always on the first
# step whose executable came from the cache; 0 of 16 without the cache.

import pytest

from tests import tiny_models


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """variant name -> directory of a saved tiny random HF model (built once per session)."""
    cache = {}

    def build(variant: str):
        if variant not in cache:
            directory = tmp_path_factory.mktemp(variant)
            tiny_models.save_tiny_model(variant, directory)
            cache[variant] = directory
        return cache[variant]

    return build
