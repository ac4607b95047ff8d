"""The hardware a program is compiled for: this machine, a TPU slice or a GPU host.

    target = targets.resolve("v5p:2x2x2")      # 8 compile-only TPU v5p devices
    target = targets.resolve("h100x8")         # one host of 8 H100 80GB
    target = targets.resolve("")               # this machine's own devices

A named target needs no such hardware: XLA's own TPU compiler (libtpu) and GPU compiler (the
CUDA PJRT plugin) build programs for a described topology on any host, and
`jax.jit(...).lower(...).compile()` over a mesh of the target's devices gives that compiler's
memory figures. The compilers are found as installed packages (`pip install -e '.[compile]'`)
or in a folder of their own, `$DASD_JAX_COMPILERS` or `{sys.prefix}/accelerator-compilers`
(what `make test` installs): kept off the import path, they never make this host's JAX probe
for hardware it does not have.

Names: `v4:AxBxC`, `v5p:AxBxC`, `v5e:AxB`, `v6e:AxB` (a TPU slice of that many chips, one JAX
device per chip), Cloud TPU's accelerator types (`v5litepod-16` = v5e:4x4, `v6e-8`,
`v5p-16` = v5p:2x2x2, `v4-32`: v4 and v5p count TensorCores, two per chip) and `h100xN`,
`h200xN`, `a100xN` (N GPUs, 8 per host above 8).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import jax

from dasd_jax.errors import UserError

PLATFORMS = ("cpu", "gpu", "tpu")
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published figures of one accelerator (one JAX device). memory_bytes: HBM as its
    runtime reports it; peak_flops: dense bf16 FLOP/s; hbm_bandwidth: bytes/s."""

    name: str
    platform: str
    memory_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    device_kind: str  # the regular expression `jax.Device.device_kind` matches (lower case)


GIB = 2 ** 30

# TPU figures: Cloud TPU's system architecture pages (per chip; v4 and v5p in megacore mode,
# one device per chip). GPU figures: NVIDIA's datasheets (SXM parts, dense bf16), memory as the
# CUDA driver reports it.
TPU_CHIPS = {
    "v4": Chip("TPU v4", "tpu", 32 * GIB, 275e12, 1200e9, r"tpu v4"),
    "v5e": Chip("TPU v5e", "tpu", 16 * GIB, 197e12, 819e9, r"tpu v5 lite|tpu v5e"),
    "v5p": Chip("TPU v5p", "tpu", 95 * GIB, 459e12, 2765e9, r"tpu v5|tpu v5p"),
    "v6e": Chip("TPU v6e", "tpu", 32 * GIB, 918e12, 1640e9, r"tpu v6 lite|tpu v6e"),
}
GPU_CHIPS = {
    "h100": Chip("NVIDIA H100 80GB HBM3", "gpu", 84_942_979_072, 989e12, 3.35e12,
                 r"nvidia h100(?! pcie| nvl).*"),
    "h200": Chip("NVIDIA H200", "gpu", 150_000_000_000, 989e12, 4.8e12,
                 r"nvidia h200(?! nvl).*"),
    "a100": Chip("NVIDIA A100-SXM4-80GB", "gpu", 85_198_045_184, 312e12, 2.039e12,
                 r"nvidia a100.*"),
}
OTHER_CHIPS = (  # devices a run may meet but no named target builds for
    Chip("NVIDIA H100 PCIe", "gpu", 84_942_979_072, 756e12, 2.0e12, r"nvidia h100 pcie.*"),
    Chip("NVIDIA H100 NVL", "gpu", 100_000_000_000, 835e12, 3.9e12, r"nvidia h100 nvl.*"),
    Chip("NVIDIA H200 NVL", "gpu", 150_000_000_000, 835e12, 4.8e12, r"nvidia h200 nvl.*"),
    Chip("NVIDIA L4", "gpu", 24 * GIB, 121e12, 300e9, r"nvidia l4"),
)

# What the GPU compiler needs to know of each card: compute capability, multiprocessors and
# their limits, caches, clock and memory (the fields of XLA's GpuTargetConfig).
_GPU_DEVICE_FACTS = {
    "h100": dict(major=9, minor=0, cores=132, fpus_per_core=128, l2=50 * 2 ** 20, clock=1.98,
                 smem_per_core=233472, smem_optin=232448),
    "h200": dict(major=9, minor=0, cores=132, fpus_per_core=128, l2=60 * 2 ** 20, clock=1.98,
                 smem_per_core=233472, smem_optin=232448),
    "a100": dict(major=8, minor=0, cores=108, fpus_per_core=64, l2=40 * 2 ** 20, clock=1.41,
                 smem_per_core=167936, smem_optin=166912),
}

# TPU slices: chips per host and the chip configuration that gives one device per chip.
_TPU_LAYOUT = {"v4": ((2, 2, 1), "megacore"), "v5p": ((2, 2, 1), "megacore"),
               "v5e": ((2, 2, 1), "default"), "v6e": ((2, 2, 1), "default")}
_SINGLE_HOST_CHIPS = {"v5e": 8, "v6e": 8}  # slices up to this size are one host (2x4)

ACCEPTED_NAMES = ("v4:AxBxC, v5p:AxBxC (e.g. v5p:2x2x2), v5e:AxB, v6e:AxB (e.g. v5e:4x4), "
                  "Cloud TPU accelerator types (v5litepod-16, v6e-8, v5p-16, v4-32), "
                  "h100xN, h200xN, a100xN (e.g. h100x8); '' = this machine")
# Cloud TPU accelerator types: generation, and whether the count is of TensorCores (2 per chip)
_ACCELERATOR_TYPES = {"v5litepod": ("v5e", 1), "v5e": ("v5e", 1), "v6e": ("v6e", 1),
                      "v5p": ("v5p", 2), "v4": ("v4", 2)}


def topology_name(accelerator_type: str) -> str | None:
    """Our name of a Cloud TPU accelerator type (`v5litepod-16` -> `v5e:4x4`, `v5p-16` ->
    `v5p:2x2x2`), or None when it is not one. Slices of 2^k chips get the shapes Cloud TPU
    gives them: 2-D for v5e and v6e (2x4, 4x4, 4x8, ...), 3-D for v4 and v5p (2x2x1, 2x2x2,
    2x2x4, 2x4x4, 4x4x4, ...)."""
    found = re.fullmatch(r"(v5litepod|v5e|v6e|v5p|v4)-(\d+)", accelerator_type.strip().lower())
    if not found:
        return None
    generation, per_chip = _ACCELERATOR_TYPES[found.group(1)]
    chips, remainder = divmod(int(found.group(2)), per_chip)
    if remainder or chips < 1 or chips & (chips - 1):
        return None
    bits = chips.bit_length() - 1
    if generation in ("v5e", "v6e"):
        dims = (2 ** (bits // 2), 2 ** (bits - bits // 2))
    elif bits <= 2:
        dims = (min(chips, 2), max(chips // 2, 1), 1)
    else:
        dims = tuple(2 ** (bits // 3 + (i >= 3 - bits % 3)) for i in range(3))
    return f"{generation}:{'x'.join(map(str, dims))}"


@dataclasses.dataclass(frozen=True)
class Target:
    """What programs are compiled for: a platform and its devices (compile-only ones for a named
    target), with the chip's figures when they are known (None for a CPU)."""

    name: str
    platform: str
    devices: tuple
    chip: Chip | None

    @property
    def compile_only(self) -> bool:
        return bool(self.name)

    @property
    def usable_bytes(self) -> int | None:
        """Memory one device's programs may take. GPU: JAX's allocator takes
        XLA_PYTHON_CLIENT_MEM_FRACTION of the card (0.75 unless set); TPU: the HBM (its
        compiler keeps its own reserve and refuses a program that does not fit); CPU: the
        host's memory shared by its local devices."""
        if self.platform == "cpu":
            return host_memory_bytes() // max(len(jax.local_devices()), 1)
        if self.chip is None:
            return None
        if self.platform == "gpu":
            return int(self.chip.memory_bytes * gpu_memory_fraction())
        return self.chip.memory_bytes

    def describe(self) -> str:
        kind = self.chip.name if self.chip else self.devices[0].device_kind
        where = "compile-only" if self.compile_only else "this machine"
        return f"{len(self.devices)} x {kind} ({self.name or self.platform}, {where})"


def gpu_memory_fraction() -> float:
    """The share of a GPU's memory JAX's allocator may use (XLA_PYTHON_CLIENT_MEM_FRACTION)."""
    try:
        return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    except ValueError:
        return 0.75


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def chip_of(device_kind: str) -> Chip | None:
    """The Chip a `jax.Device.device_kind` names, or None (a CPU, an unknown device)."""
    kind = " ".join(device_kind.lower().split())
    for chip in (*GPU_CHIPS.values(), *OTHER_CHIPS, *TPU_CHIPS.values()):
        if re.fullmatch(chip.device_kind, kind):
            return chip
    return None


def platform_for(config) -> str:
    """The platform a run's programs are built for: `model.platform` when set, else the
    `compile_for` target's, else "" (this host's backend, decided when tracing)."""
    chosen = config.model.get("platform", "auto")
    if chosen != "auto":
        return chosen
    name = config.get("compile_for", "").strip().lower()
    if not name:
        return ""
    return "tpu" if re.match(r"v\d", name) else "gpu"


def device_count(name: str) -> int | None:
    """The devices a target name has (one per TPU chip, one per GPU), without building it;
    None for "" (this machine) and for names that are no target."""
    name = (topology_name(name.strip()) or name.strip()).lower()
    tpu = re.fullmatch(r"(?:v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name)
    gpu = re.fullmatch(r"(?:h100|h200|a100)x(\d+)", name)
    if tpu:
        return math.prod(int(size) for size in tpu.group(1).split("x"))
    return int(gpu.group(1)) if gpu else None


# ----------------------------------------------------------------------------- resolving a name


def resolve(name: str) -> Target:
    """The Target a `compile_for` name means; UserError naming the accepted names otherwise."""
    name = name.strip()
    if not name:
        devices = tuple(jax.devices())
        return Target("", jax.default_backend(), devices, chip_of(devices[0].device_kind))
    tpu = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+){1,2})",
                       (topology_name(name) or name).lower())
    gpu = re.fullmatch(r"(h100|h200|a100)x(\d+)", name.lower())
    if tpu:
        return _tpu_target(name, tpu.group(1), tuple(int(n) for n in tpu.group(2).split("x")))
    if gpu:
        return _gpu_target(name, gpu.group(1), int(gpu.group(2)))
    raise UserError(f"--config.compile_for={name!r} is not a target name; accepted: "
                    f"{ACCEPTED_NAMES}")


def _tpu_target(name: str, generation: str, shape: tuple[int, ...]) -> Target:
    if len(shape) != (3 if generation in ("v4", "v5p") else 2) or min(shape) < 1:
        dims = "AxBxC" if generation in ("v4", "v5p") else "AxB"
        raise UserError(f"--config.compile_for={name!r}: a {generation} slice is named "
                        f"{generation}:{dims}; accepted: {ACCEPTED_NAMES}")
    chips = 1
    for size in shape:
        chips *= size
    per_host, chip_config = _TPU_LAYOUT[generation]
    if chips <= _SINGLE_HOST_CHIPS.get(generation, 0):
        per_host = (*shape, 1)[:3]
    per_host = tuple(min(a, b) for a, b in zip(per_host, (*shape, 1)[:3]))
    library = _tpu_library()
    from jax.experimental import topologies

    # No TPU is driven, so several processes may load libtpu at once (its lockfile guards a
    # chip's exclusive use).
    with _compiler_output() as captured, _env(TPU_LIBRARY_PATH=library, TPU_LOG_DIR=_log_dir(),
                                               ALLOW_MULTIPLE_LIBTPU_LOAD="1"):
        try:
            topology = topologies.get_topology_desc(
                topology_name=f"{generation}:{'x'.join(map(str, shape))}", platform="tpu",
                chip_config_name=chip_config, chips_per_host_bounds=per_host,
                wrap=(False, False, False))
        except Exception as error:  # noqa: BLE001 - libtpu reports a bad shape in many ways
            raise UserError(f"--config.compile_for={name!r}: the TPU compiler rejects this "
                            f"topology ({_first_line(error, captured)}); accepted: "
                            f"{ACCEPTED_NAMES}") from None
    return Target(name, "tpu", tuple(topology.devices), TPU_CHIPS[generation])


def _gpu_target(name: str, model_name: str, count: int) -> Target:
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise UserError(f"--config.compile_for={name!r}: give 1 to {GPUS_PER_HOST} GPUs, or a "
                        f"multiple of {GPUS_PER_HOST} for several hosts of {GPUS_PER_HOST}")
    hosts, per_host = (1, count) if count <= GPUS_PER_HOST else (count // GPUS_PER_HOST,
                                                                  GPUS_PER_HOST)
    chip = GPU_CHIPS[model_name]
    from jax.experimental import topologies

    with _compiler_output() as captured:
        try:
            _register_cuda_compiler()
            topology = topologies.get_topology_desc(
                platform="cuda", topology=f"1x{hosts}x{per_host}",
                target_config=gpu_target_config(model_name))
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - the plugin reports problems in many ways
            raise UserError(f"--config.compile_for={name!r}: the GPU compiler could not describe "
                            f"this host ({_first_line(error, captured)})") from None
    return Target(name, "gpu", tuple(topology.devices), chip)


def gpu_target_config(model_name: str) -> str:
    """XLA's GpuTargetConfig (text format) of one card: what its GPU compiler needs to build
    for that card with no GPU present."""
    chip, facts = GPU_CHIPS[model_name], _GPU_DEVICE_FACTS[model_name]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {facts['smem_per_core']}
  threads_per_core_limit: 2048
  core_count: {facts['cores']}
  fpus_per_core: {facts['fpus_per_core']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.hbm_bandwidth)}
  l2_cache_size: {facts['l2']}
  clock_rate_ghz: {facts['clock']}
  device_memory_size: {chip.memory_bytes}
  shared_memory_per_block_optin: {facts['smem_optin']}
  cuda_compute_capability {{ major: {facts['major']} minor: {facts['minor']} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{chip.name}"
"""


# ----------------------------------------------------------------------------- the compilers


def compilers_dir() -> Path:
    """The folder of the accelerator compilers when they are not installed packages."""
    return Path(os.environ.get("DASD_JAX_COMPILERS") or Path(sys.prefix) / "accelerator-compilers")


INSTALL_HINT = ("install them with `python -m pip install --no-deps --target "
                "{dir} -r requirements-compile.txt` (what `make test` does) or `pip install -e "
                "'.[compile]'`")


def _tpu_library() -> str:
    """The path of libtpu.so: TPU_LIBRARY_PATH, the libtpu package, or the compilers' folder."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.environ["TPU_LIBRARY_PATH"]
    try:
        import libtpu

        return str(Path(libtpu.__file__).parent / "libtpu.so")
    except ImportError:
        pass
    candidate = compilers_dir() / "libtpu" / "libtpu.so"
    if candidate.exists():
        return str(candidate)
    raise UserError("compiling for a TPU target needs libtpu (the TPU compiler), which is not "
                    "installed; " + INSTALL_HINT.format(dir=compilers_dir()))


def _register_cuda_compiler() -> None:
    """Makes the CUDA PJRT plugin's topology factory available, loading it from the compilers'
    folder when JAX did not discover it as a package. This host's backends are started first,
    so the plugin only ever compiles and never probes for a GPU here."""
    from jax._src import xla_bridge

    jax.devices()
    if "cuda" in xla_bridge._topology_factories:
        return
    library = compilers_dir() / "jax_plugins" / "xla_cuda12" / "xla_cuda_plugin.so"
    if not library.exists():
        raise UserError("compiling for a GPU target needs the CUDA compiler plugin "
                        "(jax-cuda12-pjrt), which is not installed; "
                        + INSTALL_HINT.format(dir=compilers_dir()))
    xla_bridge.register_plugin("cuda", library_path=str(library))


def _log_dir() -> str:
    """Where libtpu writes its logs (the full out-of-memory report among them)."""
    return os.environ.get("TPU_LOG_DIR") or str(Path(tempfile.gettempdir()) / "dasd_jax_tpu_logs")


@contextlib.contextmanager
def _env(**values: str):
    """Sets environment variables for the duration of the block."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _compiler_output():
    """Holds back what the compilers' libraries print on the process's stderr while they load
    (they probe for hardware that a compile-only target does not have); yields a callable
    that returns the text, for error messages."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode("utf-8", "replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_line(error: Exception, captured) -> str:
    text = str(error).strip() or captured().strip()
    return text.splitlines()[0] if text else type(error).__name__
