"""Test environment: CPU only, offline, 8 simulated devices. Set before JAX or HF are imported."""

import os
import tempfile

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
    os.environ["XLA_FLAGS"] += (" --xla_cpu_collective_call_terminate_timeout_seconds=1200"
                                " --xla_cpu_collective_call_warn_stuck_timeout_seconds=600")

# Many tests (and the CLI processes they start) compile the same tiny programs: share compiled
# executables through JAX's persistent cache, a fresh directory per test session. Subprocesses
# and pytest-xdist workers inherit the variables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dasd_jax_test_jax_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402


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
