"""Environments for the Python processes that tests start (CLIs, jax.distributed hosts)."""

import os
import re


def environment(devices: int) -> dict[str, str]:
    """This process's environment (conftest's XLA flags included) with `devices` simulated CPU
    devices in the child."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ["XLA_FLAGS"])
    return {**os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {flags.strip()}"}
