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
