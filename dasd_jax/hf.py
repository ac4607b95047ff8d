"""Hugging Face checkpoint directory <-> (ModelConfig, params), and tokenizers.

    cfg, params = hf.load("path/or/hub-id", dtype=jnp.bfloat16, mesh=mesh)
    hf.save("out_dir", cfg, params, tokenizer=tokenizer)   # transformers / vLLM load it unchanged
    hf.save("out_dir", cfg, params, lora=adapters)         # LoRA adapters merged in
    hf.save_adapters("adapter_dir", cfg, adapters)         # PEFT's layout (PeftModel loads it)
    tokenizer = hf.load_tokenizer("path/or/hub-id", cfg)

Conversion is a table (`tensor_table`): each HF tensor maps to one param path, per layer for the
stacked `layers` params, with a transpose for kernels and a reshape to split heads. Safetensors are
read lazily, one param at a time, and each param goes straight into its sharding on `mesh`.
Pickle checkpoints (`*.bin`) and custom modeling code are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from dasd_jax import lora as lora_lib
from dasd_jax import model as model_lib
from dasd_jax import sharding as sharding_lib
from dasd_jax.errors import CheckpointError

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel wrapping, in every key
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "consolidated*.pth")
IGNORED_CHECKPOINT_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
HUB_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
                         "*.jinja"]


# ----------------------------------------------------------------------------- locating checkpoints


def _looks_like_hub_id(path: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", path)) and not path.startswith(".")


def resolve(path: str | os.PathLike) -> Path:
    """A local checkpoint directory for `path`: the directory itself, or a hub download.

    Hub ids (`org/name`) download config, safetensors and tokenizer files into the HF cache.
    Offline (or with HF_HUB_OFFLINE=1 and nothing cached) this fails at once, saying how to pass
    a local directory instead.
    """
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that contains it")
    if not _looks_like_hub_id(str(path)):
        raise CheckpointError(f"no checkpoint directory at {path}")
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(str(path), allow_patterns=HUB_DOWNLOAD_PATTERNS,
                                      local_files_only=constants.HF_HUB_OFFLINE))
    except Exception as error:  # noqa: BLE001 - offline, unknown, gated repo, network down: one message
        raise CheckpointError(
            f"{path} is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"Download it where the Hub is reachable, e.g. `hf download {path} --local-dir DIR`, "
            "and pass DIR instead."
        ) from None


# ----------------------------------------------------------------------------- configs


def _rope_fields(hf: dict) -> dict:
    """ModelConfig RoPE fields from either the transformers-v5 `rope_parameters` or the legacy
    `rope_theta` + `rope_scaling` form."""
    params = dict(hf.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise CheckpointError("per-layer-type RoPE parameters are not supported")
    legacy = dict(hf.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in model_lib.ROPE_TYPES:
        raise CheckpointError(
            f"config.json: rope type {rope_type!r} is not supported (supported: "
            f"{', '.join(model_lib.ROPE_TYPES)})"
        )
    if merged.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("config.json: partial_rotary_factor != 1 is not supported")
    fields = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        fields["rope_factor"] = float(merged["factor"])
    if rope_type == "llama3":
        fields.update(
            rope_low_freq_factor=float(merged["low_freq_factor"]),
            rope_high_freq_factor=float(merged["high_freq_factor"]),
            rope_original_max_position=int(merged.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))),
        )
    return fields


def _sliding_window(hf: dict) -> int | None:
    model_type = hf["model_type"]
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    layer_types = hf.get("layer_types")
    if window is not None and model_type in ("qwen2", "qwen3"):
        first_sliding = hf.get("max_window_layers", 0)
        layer_types = layer_types or [
            "sliding_attention" if i >= first_sliding else "full_attention"
            for i in range(hf["num_hidden_layers"])
        ]
    if layer_types and window is not None and len(set(layer_types)) > 1:
        raise CheckpointError(
            "config.json mixes sliding-window and full-attention layers "
            f"({sorted(set(layer_types))}); only uniform attention is supported"
        )
    if layer_types and set(layer_types) == {"full_attention"}:
        window = None
    return int(window) if window is not None else None


def _token_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def config_from_hf(hf: dict, dtype: Any = None, compute_dtype: Any = None) -> model_lib.ModelConfig:
    """ModelConfig from a parsed HF `config.json` dict; raises CheckpointError on anything the
    decoder does not compute exactly as transformers would."""
    if "auto_map" in hf:
        raise CheckpointError(
            "config.json has `auto_map`: this checkpoint needs custom modeling code "
            "(trust_remote_code), which dasd_jax never runs. Use a checkpoint of a supported "
            f"architecture: {', '.join(ARCHITECTURES)}"
        )
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise CheckpointError(
            f"config.json: model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(ARCHITECTURES)}"
        )
    if hf.get("quantization_config"):
        raise CheckpointError("config.json: quantized checkpoints are not supported; use the "
                              "bf16/fp32 release of the model")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (only silu)")
    try:
        heads = int(hf["num_attention_heads"])
        stored_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        dtype = jnp.dtype(dtype if dtype is not None else stored_dtype)
        return model_lib.ModelConfig(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            out_bias=model_type in ("llama", "qwen3") and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(hf),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_token_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            dtype=compute_dtype if compute_dtype is not None else dtype,
            param_dtype=dtype,
            **_rope_fields(hf),
        )
    except KeyError as missing:
        raise CheckpointError(f"config.json lacks required field {missing}") from None
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"config.json: {error}") from None


def config_to_hf(cfg: model_lib.ModelConfig, dtype: Any = None) -> dict:
    """A `config.json` dict that transformers (v4 and v5) and vLLM read back as `cfg`."""
    dtype_name = jnp.dtype(dtype if dtype is not None else cfg.param_dtype).name
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type in ("linear", "llama3"):
        rope["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    eos = list(cfg.eos_token_ids)
    hf = {
        "architectures": [ARCHITECTURES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_type == "default" else {k: v for k, v in rope.items()
                                                                 if k != "rope_theta"},
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": cfg.pad_token_id,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "use_cache": True,
    }
    if cfg.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "llama":
        hf["mlp_bias"] = cfg.mlp_bias
    if cfg.model_type in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=cfg.sliding_window is not None,
                  sliding_window=cfg.sliding_window, max_window_layers=0)
    if cfg.model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    return hf


# ----------------------------------------------------------------------------- the tensor table


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One HF tensor family <-> one param. `hf_name` holds `{i}` for per-layer tensors, whose
    param is stacked on a leading layer axis. Kernels are stored transposed ([out, in]) by HF."""

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    transpose: bool = False

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_name


def tensor_table(cfg: model_lib.ModelConfig) -> list[TensorEntry]:
    """Every HF tensor of `cfg`'s checkpoint, with its param path and expected HF shape."""
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_heads * e, cfg.num_kv_heads * e
    layer = "model.layers.{i}."
    table = [
        TensorEntry(("embed_tokens", "embedding"), "model.embed_tokens.weight",
                    (cfg.vocab_size, d)),
        TensorEntry(("norm", "scale"), "model.norm.weight", (d,)),
        TensorEntry(("layers", "input_layernorm", "scale"), layer + "input_layernorm.weight", (d,)),
        TensorEntry(("layers", "post_attention_layernorm", "scale"),
                    layer + "post_attention_layernorm.weight", (d,)),
    ]
    if not cfg.tie_word_embeddings:
        table.append(TensorEntry(("lm_head", "kernel"), "lm_head.weight", (cfg.vocab_size, d),
                                 True))
    projections = [("q_proj", q_out, d), ("k_proj", kv_out, d), ("v_proj", kv_out, d),
                   ("o_proj", d, q_out)]
    for name, out_dim, in_dim in projections:
        path, hf_name = ("layers", "self_attn", name), f"{layer}self_attn.{name}."
        table.append(TensorEntry(path + ("kernel",), hf_name + "weight", (out_dim, in_dim), True))
        if (cfg.qkv_bias and name != "o_proj") or (cfg.out_bias and name == "o_proj"):
            table.append(TensorEntry(path + ("bias",), hf_name + "bias", (out_dim,)))
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            table.append(TensorEntry(("layers", "self_attn", name, "scale"),
                                     f"{layer}self_attn.{name}.weight", (e,)))
    for name, out_dim, in_dim in [("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)]:
        path, hf_name = ("layers", "mlp", name), f"{layer}mlp.{name}."
        table.append(TensorEntry(path + ("kernel",), hf_name + "weight", (out_dim, in_dim), True))
        if cfg.mlp_bias:
            table.append(TensorEntry(path + ("bias",), hf_name + "bias", (out_dim,)))
    return table


def _hf_names(entry: TensorEntry, num_layers: int) -> list[str]:
    if entry.per_layer:
        return [entry.hf_name.format(i=i) for i in range(num_layers)]
    return [entry.hf_name]


def _to_param_layout(tensor: np.ndarray, entry: TensorEntry,
                     param_shape: tuple[int, ...]) -> np.ndarray:
    return (tensor.T if entry.transpose else tensor).reshape(param_shape)


def _to_hf_layout(array: np.ndarray, entry: TensorEntry) -> np.ndarray:
    if entry.transpose:
        return np.ascontiguousarray(array.reshape(entry.hf_shape[::-1]).T)
    return np.ascontiguousarray(array.reshape(entry.hf_shape))


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- reading


class _SafetensorsReader:
    """Lazy access to the tensors of a single-file or sharded safetensors checkpoint."""

    def __init__(self, directory: Path):
        index_path = directory / SAFETENSORS_INDEX
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise CheckpointError(
                    f"{index_path} is not a valid safetensors index: {error}") from None
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_SAFETENSORS).exists():
            files = [SINGLE_SAFETENSORS]
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            pickles = [p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern)]
            if pickles:
                raise CheckpointError(
                    f"{directory} holds only pickle weights ({', '.join(sorted(pickles)[:3])}); "
                    "pickle files can run arbitrary code and are not loaded. Convert them to "
                    "safetensors first: `python -c \"import transformers as t; "
                    f"t.AutoModelForCausalLM.from_pretrained('{directory}')"
                    ".save_pretrained('OUT_DIR')\"` in a trusted environment, then pass OUT_DIR"
                )
            raise CheckpointError(f"{directory} has no model.safetensors (or sharded "
                                  f"safetensors with {SAFETENSORS_INDEX})")
        self._handles, self.shapes = {}, {}
        for name in files:
            file_path = directory / name
            if not file_path.exists():
                raise CheckpointError(f"{SAFETENSORS_INDEX} lists {name}, which is missing "
                                      f"from {directory}")
            try:
                handle = safe_open(str(file_path), framework="np")
            except Exception as error:  # noqa: BLE001 - safetensors raises many kinds for a bad file
                raise CheckpointError(
                    f"{file_path} is not a readable safetensors file: {error}") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.shapes[key] = (name, tuple(handle.get_slice(key).get_shape()))

    def read(self, key: str) -> np.ndarray:
        return self._handles[self.shapes[key][0]].get_tensor(key)


def _check_tensors(table: list[TensorEntry], reader: _SafetensorsReader, cfg, directory) -> None:
    expected = {name: entry.hf_shape for entry in table
                for name in _hf_names(entry, cfg.num_layers)}
    found = {k: shape for k, (_, shape) in reader.shapes.items()
             if not IGNORED_CHECKPOINT_KEYS.match(k)}
    if cfg.tie_word_embeddings:
        found.pop("lm_head.weight", None)
    problems = [f"missing tensor {name} (expected shape {list(shape)})"
                for name, shape in expected.items() if name not in found]
    problems += [f"unexpected tensor {name} (shape {list(shape)})"
                 for name, shape in found.items() if name not in expected]
    problems += [f"tensor {name} has shape {list(found[name])}, expected {list(shape)}"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    if problems:
        more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        shown = problems[:20] + more
        raise CheckpointError(
            f"the tensors in {directory} do not match its config.json "
            f"({cfg.model_type}, {cfg.num_layers} layers):\n  " + "\n  ".join(shown)
        )


def read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{directory} has no config.json; pass a Hugging Face checkpoint "
                              "directory (config.json + *.safetensors)")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None


def generation_eos_ids(directory: Path) -> tuple[int, ...]:
    """End-of-sequence ids of `generation_config.json` (instruct models often list several)."""
    path = directory / "generation_config.json"
    if not path.exists():
        return ()
    try:
        return _token_ids(json.loads(path.read_text()).get("eos_token_id"))
    except (json.JSONDecodeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not valid: {error}") from None


def load(path: str | os.PathLike, dtype: Any = None, mesh: jax.sharding.Mesh | None = None, *,
         compute_dtype: Any = None, rules=sharding_lib.LOGICAL_AXIS_RULES):
    """(cfg, params) from an HF checkpoint directory or hub id.

    dtype: param dtype (default: the checkpoint's own `dtype`/`torch_dtype`, else float32).
    cfg.eos_token_ids joins config.json's and generation_config.json's end-of-sequence ids.
    compute_dtype: activation dtype (default: dtype).
    mesh: when given, every param is created directly in its sharding (see sharding.py): each
      process reads one param at a time from disk and hands each of its devices only that
      device's slice; otherwise params go to the default device.
    """
    directory = resolve(path)
    cfg = config_from_hf(read_config(directory), dtype, compute_dtype)
    cfg = cfg.replace(eos_token_ids=cfg.eos_token_ids + tuple(
        i for i in generation_eos_ids(directory) if i not in cfg.eos_token_ids))
    reader = _SafetensorsReader(directory)
    table = tensor_table(cfg)
    _check_tensors(table, reader, cfg, directory)
    shapes = model_lib.param_shapes(cfg)
    shardings = None if mesh is None else sharding_lib.param_shardings(cfg, mesh, rules)
    params: dict = {}
    for entry in table:
        param_shape = _get(shapes, entry.path).shape
        layer_shape = param_shape[1:] if entry.per_layer else param_shape
        host = np.stack([
            _to_param_layout(reader.read(name), entry, layer_shape).astype(cfg.param_dtype)
            for name in _hf_names(entry, cfg.num_layers)
        ]) if entry.per_layer else _to_param_layout(
            reader.read(entry.hf_name), entry, layer_shape).astype(cfg.param_dtype)
        value = (jnp.asarray(host) if shardings is None
                 else sharding_lib.place(host, _get(shardings, entry.path)))
        _set(params, entry.path, value)
    return cfg, params


# ----------------------------------------------------------------------------- writing


def _hf_tensors(cfg, params, dtype, lora=None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) pairs, one param at a time on the host; LoRA adapters (when given)
    are merged into their kernels one kernel at a time."""
    adapters = lora_lib.modules(lora) if lora is not None else {}
    for entry in tensor_table(cfg):
        value = _get(params, entry.path)
        if entry.path[:-1] in adapters and entry.path[-1] == "kernel":
            value = lora_lib.merged_kernel(cfg, value, adapters[entry.path[:-1]], dtype)
        host = sharding_lib.to_host(value).astype(dtype)
        if entry.per_layer:
            for i, name in enumerate(_hf_names(entry, cfg.num_layers)):
                yield name, _to_hf_layout(host[i], entry)
        else:
            yield entry.hf_name, _to_hf_layout(host, entry)


def _shard_plan(cfg, dtype, max_shard_bytes: int) -> list[list[str]]:
    """HF names grouped into files of at most max_shard_bytes (a larger tensor gets its own)."""
    itemsize = jnp.dtype(dtype).itemsize
    shards: list[list[str]] = [[]]
    size = 0
    for entry in tensor_table(cfg):
        nbytes = math.prod(entry.hf_shape) * itemsize
        for name in _hf_names(entry, cfg.num_layers):
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
    return shards


@contextlib.contextmanager
def _written_whole(path: str | os.PathLike) -> Iterator[Path | None]:
    """Yields a staging directory (None on processes other than 0) that becomes `path` when the
    block ends without error, replacing any previous `path`; on error it is removed."""
    target = Path(path).expanduser()
    staging = None
    if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if staging is not None:
            if target.exists():
                previous = target.with_name(f".{target.name}.previous-{os.getpid()}")
                target.rename(previous)
                staging.rename(target)
                shutil.rmtree(previous)
            else:
                staging.rename(target)
    except BaseException:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def save(path: str | os.PathLike, cfg: model_lib.ModelConfig, params, tokenizer=None, *,
         dtype: Any = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, lora=None) -> Path:
    """Writes an HF checkpoint directory that `AutoModelForCausalLM.from_pretrained` loads.

    config.json, model.safetensors (or model-0000k-of-0000n.safetensors + index above
    max_shard_bytes), generation_config.json, and the tokenizer files when given. dtype: tensor
    dtype on disk (default cfg.param_dtype). lora: LoRA adapters of `cfg` (`model.init_lora`),
    merged into their kernels (W + alpha/rank · A·B, in float32) to give an ordinary checkpoint.
    The directory appears whole or not at all: files are written to a temporary sibling and
    renamed into place. In a multi-process run every process must call this (params are
    gathered collectively); only process 0 writes.
    """
    dtype = jnp.dtype(dtype if dtype is not None else cfg.param_dtype)
    with _written_whole(path) as staging:
        plan = _shard_plan(cfg, dtype, max_shard_bytes)
        files = ([SINGLE_SAFETENSORS] if len(plan) == 1 else
                 [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))])
        file_of = {name: files[k] for k, names in enumerate(plan) for name in names}
        pending: dict[str, dict[str, np.ndarray]] = {f: {} for f in files}
        remaining = {f: len(names) for f, names in zip(files, plan)}
        total = 0
        for name, tensor in _hf_tensors(cfg, params, dtype, lora):
            file = file_of[name]
            pending[file][name] = tensor
            total += tensor.nbytes
            remaining[file] -= 1
            if remaining[file] == 0:
                if staging is not None:
                    save_file(pending[file], str(staging / file), metadata={"format": "pt"})
                pending[file] = {}
        if staging is not None:
            if len(files) > 1:
                index = {"metadata": {"total_size": total}, "weight_map": file_of}
                (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            (staging / "config.json").write_text(
                json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
            generation = {"bos_token_id": cfg.bos_token_id,
                          "eos_token_id": list(cfg.eos_token_ids) or None,
                          "pad_token_id": cfg.pad_token_id}
            (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
    return Path(path).expanduser()


def adapter_tensors(cfg: model_lib.ModelConfig, lora) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, float32 tensor) pairs of LoRA adapters, as PEFT's LoRA layers hold them:
    `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and
    `....lora_B.weight` [out, r], `in` / `out` flattened as in the HF kernel [out, in]."""
    adapters = lora_lib.modules(lora)
    for entry in tensor_table(cfg):
        module = entry.path[:-1]
        if entry.path[-1] != "kernel" or module not in adapters:
            continue
        a = sharding_lib.to_host(adapters[module]["lora_a"])  # [L, *in, r]
        b = sharding_lib.to_host(adapters[module]["lora_b"])  # [L, r, *out]
        rank = a.shape[-1]
        for i, name in enumerate(_hf_names(entry, cfg.num_layers)):
            prefix = PEFT_PREFIX + name[:-len("weight")]
            yield prefix + "lora_A.weight", np.ascontiguousarray(
                a[i].reshape(-1, rank).T.astype(np.float32))
            yield prefix + "lora_B.weight", np.ascontiguousarray(
                b[i].reshape(rank, -1).T.astype(np.float32))


def adapter_config(cfg: model_lib.ModelConfig, base_model: str | None = None) -> dict:
    """PEFT's `adapter_config.json` for the adapters of `cfg` (a LoraConfig, task CAUSAL_LM)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "revision": None,
    }


def save_adapters(path: str | os.PathLike, cfg: model_lib.ModelConfig, lora, *,
                  base_model: str | None = None) -> Path:
    """Writes LoRA adapters alone in PEFT's layout: `adapter_model.safetensors` (float32) and
    `adapter_config.json`, which `peft.PeftModel.from_pretrained(base, path)` loads onto the
    base checkpoint (`base_model`, recorded as base_model_name_or_path). Atomic and
    multi-process like `save`."""
    if not cfg.lora_rank:
        raise ValueError("save_adapters needs a cfg with LoRA adapters (lora_rank > 0)")
    tensors = dict(adapter_tensors(cfg, lora))
    with _written_whole(path) as staging:
        if staging is not None:
            save_file(tensors, str(staging / ADAPTER_SAFETENSORS), metadata={"format": "pt"})
            (staging / "adapter_config.json").write_text(
                json.dumps(adapter_config(cfg, base_model), indent=2) + "\n")
    return Path(path).expanduser()


# ----------------------------------------------------------------------------- tokenizers


def load_tokenizer(path: str | os.PathLike, cfg: model_lib.ModelConfig | None = None):
    """The checkpoint's `AutoTokenizer` (fast, with its chat template when it has one).

    With `cfg`, checks that every token id fits the embedding table.
    """
    from transformers import AutoTokenizer

    directory = resolve(path)
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.exists() and "auto_map" in json.loads(tokenizer_config.read_text()):
        raise CheckpointError(f"{tokenizer_config} has `auto_map`: the tokenizer needs custom "
                              "code (trust_remote_code), which dasd_jax never runs")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load a tokenizer from {directory}: {error}") from None
    if cfg is not None and len(tokenizer) > cfg.vocab_size:
        raise CheckpointError(
            f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's embedding "
            f"table has only {cfg.vocab_size} rows (config.json vocab_size); token ids past "
            f"{cfg.vocab_size - 1} would index out of range. Use the tokenizer that belongs to "
            "this checkpoint, or resize the embeddings before fine-tuning"
        )
    return tokenizer
