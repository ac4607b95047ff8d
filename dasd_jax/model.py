"""One decoder for Llama 3.x, Qwen2/2.5, Qwen3 and Mistral checkpoints.

The module tree mirrors Hugging Face's (`embed_tokens`, `layers/self_attn/q_proj`, ...), so
checkpoint conversion in `hf.py` is a table of transposes and reshapes. RoPE uses the split-half
layout of HF (`rotate_half`), so no permutation of q/k weights is needed.

Layers run under `nn.scan` (params stacked on a leading `layers` axis) with a configurable
rematerialization policy. Every param carries logical axis names (`embed`, `heads`, `mlp`, ...);
`sharding.py` maps them to mesh axes.

The public surface is pure functions over a params pytree:

    params = init(cfg, rng)
    logits = forward(cfg, params, tokens)                 # float[B, T, V] in cfg.dtype
    hidden = hidden_states(cfg, params, tokens)           # float[B, T, D], after the final norm
    logits = unembed(cfg, params, hidden)                 # any leading shape

LoRA: with `cfg.lora_rank > 0` every projection named in `cfg.lora_targets` adds a low-rank
update `(alpha / rank) · x·A·B`. A and B live in their own pytree (the `lora` collection,
stacked on the layer axis like the params), so the params tree stays the HF-mapped one and
the adapters are switched off by running the same params under a rank-0 config:

    adapters = init_lora(cfg, rng)                        # B = 0: starts as the base model
    logits = forward(cfg, params, tokens, lora=adapters)  # adapted
    logits = forward(adapters_off(cfg), params, tokens)   # the base, from the same params
    merged = lora.merge(cfg, params, adapters)            # plain params (dasd_jax/lora.py)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
PLATFORMS = ("", "cpu", "gpu", "tpu")
# The projections LoRA can adapt, by their HF module names.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a decoder; hashable, so it can be a static jit argument.

    `dtype` is the compute dtype (activations, matmul inputs); `param_dtype` is the storage dtype
    of the params. Both accept anything `jnp.dtype` accepts. `platform` decides the
    backend-specific paths (`compile_platform`): set it when compiling for other hardware than
    this host's. `lora_rank > 0` adds LoRA adapters
    (always float32) to the projections in `lora_targets` (a tuple, or a comma-separated string).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat_policy: str = "none"
    scan_unroll: int = 1  # layers per iteration of the layer scan (num_layers: no loop at all)
    attention_impl: str = "auto"
    platform: str = ""  # what programs are compiled for: cpu | gpu | tpu ("" = this host's)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "lora_targets", parse_lora_targets(self.lora_targets))
        problems = []
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            problems.append(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_type not in ROPE_TYPES:
            problems.append(f"rope_type {self.rope_type!r} is not one of {ROPE_TYPES}")
        if not 1 <= self.scan_unroll <= max(self.num_layers, 1):
            problems.append(f"scan_unroll={self.scan_unroll} must lie in [1, num_layers]")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy {self.remat_policy!r} is not one of {REMAT_POLICIES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl {self.attention_impl!r} is not one of "
                            f"{ATTENTION_IMPLS}")
        if self.platform not in PLATFORMS:
            problems.append(f"platform {self.platform!r} is not one of {PLATFORMS}")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown:
            problems.append(f"lora_targets {unknown} are not among {LORA_TARGETS}")
        if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_rank={self.lora_rank} must be >= 0 and lora_dropout="
                            f"{self.lora_dropout} in [0, 1)")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count, embeddings included (tied embeddings counted once)."""
        d, f, h, k, e = (self.hidden_size, self.intermediate_size, self.num_heads,
                         self.num_kv_heads, self.head_dim)
        attn = d * e * (2 * h + 2 * k) + (e * (h + 2 * k) if self.qkv_bias else 0)
        attn += (d if self.out_bias else 0) + (2 * e if self.qk_norm else 0)
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    @property
    def lora_scale(self) -> float:
        """The factor alpha / rank of the adapters' update (0 without adapters)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def num_lora_params(self) -> int:
        """Adapter parameter count: rank · (in + out) per targeted projection and layer."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        sizes = {"q_proj": d + q, "k_proj": d + kv, "v_proj": d + kv, "o_proj": q + d,
                 "gate_proj": d + f, "up_proj": d + f, "down_proj": f + d}
        return self.lora_rank * self.num_layers * sum(sizes[t] for t in self.lora_targets)


def parse_lora_targets(targets) -> tuple[str, ...]:
    """("q_proj", "v_proj") from "q_proj, v_proj" or any sequence of names."""
    if isinstance(targets, str):
        targets = targets.split(",")
    return tuple(t.strip() for t in targets if t.strip())


def adapters_off(cfg: ModelConfig) -> ModelConfig:
    """The same model without its LoRA adapters: run it on the same params to get the base."""
    return cfg.replace(lora_rank=0)


# ----------------------------------------------------------------------------- rotary embedding


def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """float32[head_dim // 2] inverse frequencies, computed as transformers does."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        old_context = cfg.rope_original_max_position
        low_freq_wavelen = old_context / cfg.rope_low_freq_factor
        high_freq_wavelen = old_context / cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old_context / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos, sin: dtype[B, T, head_dim // 2] for int positions[B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg))
    return jnp.cos(angles).astype(cfg.dtype), jnp.sin(angles).astype(cfg.dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates x[B, T, N, H] by split-half RoPE; cos, sin: [B, T, H // 2]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- positions and masks


def segment_positions(segment_ids: Array) -> Array:
    """int32[B, T] position of each token within its packed segment (0 at each segment start)."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def segment_mask(segment_ids: Array) -> Array:
    """bool[B, 1, T, T]: query and key lie in the same packed segment (causality applied apart)."""
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def compile_platform(cfg: ModelConfig) -> str:
    """The platform cfg's programs are built for (cpu, gpu or tpu): `cfg.platform`, or this
    host's JAX backend. Every backend-specific path of the model and of decoding follows it."""
    return cfg.platform or jax.default_backend()


def _attention_implementation(cfg: ModelConfig) -> str:
    """cuDNN's fused attention for 16-bit GPU programs when cuDNN is there (this process runs
    on GPUs; a GPU program compiled on another host uses XLA's); XLA's otherwise."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    cudnn_ok = (
        compile_platform(cfg) == "gpu"
        and jax.default_backend() == "gpu"
        and cfg.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and cfg.head_dim % 8 == 0
        and cfg.head_dim <= 128
    )
    return "cudnn" if cudnn_ok else "xla"


def attention(cfg: ModelConfig, q: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """Causal GQA attention of a whole sequence (training, scoring). q: [B, T, N, H]; k, v:
    [B, T, K, H]; mask: bool[B, 1, T, T] on top of causality (packed segments) or None; a
    sliding window when the model has one. Returns [B, T, N, H]."""
    window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, local_window_size=window,
        implementation=_attention_implementation(cfg),
    )


# ----------------------------------------------------------------------------- KV cache

DECODE_BLOCK = 64  # cache slots a decode step's attention reads at a time


class KVCache(NamedTuple):
    """Keys and values of every layer for decoding. Row b's tokens sit at slots 0 ...
    lengths[b] - 1 (slot = position), so rows may hold sequences of any length and a finished
    row can be refilled with another prompt (continuous batching).

    keys, values: [L, B, K, S, H], head-major so that each head's slots are contiguous for the
    attention products; lengths: int32[B], the slots filled in each row.
    """

    keys: Array
    values: Array
    lengths: Array


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache for `batch` rows of up to `length` tokens, in cfg.dtype. A length that is
    a multiple of DECODE_BLOCK lets decode steps read only the filled blocks."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype),
                   jnp.zeros((batch,), jnp.int32))


def cache_mask(cfg: ModelConfig, lengths: Array, new: int, slots: int, first_slot=0) -> Array:
    """bool[B, 1, T, S]: new token t of row b (at slot lengths[b] + t) sees the slots up to its
    own (within the sliding window), for key slots first_slot ... first_slot + S - 1. Slots past
    a row's length hold nothing it can see."""
    query_slots = lengths[:, None, None] + jnp.arange(new)[None, :, None]
    key_slots = first_slot + jnp.arange(slots)[None, None, :]
    allowed = key_slots <= query_slots
    if cfg.sliding_window is not None:
        allowed &= query_slots - key_slots < cfg.sliding_window
    return allowed[:, None]


def _grouped(cfg: ModelConfig, q: Array) -> Array:
    """q [B, T, N, H] -> [B, K, G, T, H]: the G query heads of each KV head together (head
    n = k * G + g, as transformers' repeat_kv pairs them)."""
    b, t, _, h = q.shape
    k = cfg.num_kv_heads
    return q.reshape(b, t, k, cfg.num_heads // k, h).transpose(0, 2, 3, 1, 4)


def _ungrouped(out: Array) -> Array:
    """[B, K, G, T, H] -> [B, T, N, H]."""
    b, k, g, t, h = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, k * g, h)


def cached_attention(cfg: ModelConfig, q: Array, stacked_keys: Array, stacked_values: Array,
                     layer: Array, lengths: Array) -> Array:
    """Attention of T new tokens per row (at slots lengths[b] ...) to layer `layer` of the cache,
    whose keys and values are already written. q: [B, T, N, H]; stacked: [L, B, K, S, H].

    One new token (a decode step) reads the cache DECODE_BLOCK slots at a time, only up to the
    longest row's block, with an online softmax: its cost follows what is filled, not the
    cache's length. Several (a prefill, into a cache of their bucket's length) attend at once.
    """
    scale = 1.0 / np.sqrt(cfg.head_dim)
    grouped = _grouped(cfg, q).astype(jnp.float32) * scale
    slots = stacked_keys.shape[3]
    if q.shape[1] > 1 or slots % DECODE_BLOCK:
        keys, values = (jax.lax.dynamic_index_in_dim(stacked, layer, 0, keepdims=False)
                        for stacked in (stacked_keys, stacked_values))
        scores = jnp.einsum("bkgth,bksh->bkgts", grouped, keys.astype(jnp.float32))
        mask = cache_mask(cfg, lengths, q.shape[1], slots)[:, :, None]
        weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        out = jnp.einsum("bkgts,bksh->bkgth", weights, values.astype(jnp.float32))
        return _ungrouped(out).astype(q.dtype)
    batch, kv, group, _, width = grouped.shape

    def block(j, carry):
        best, total, acc = carry
        start = (layer, 0, 0, j * DECODE_BLOCK, 0)
        size = (1, batch, kv, DECODE_BLOCK, width)
        keys, values = (jax.lax.dynamic_slice(stacked, start, size)[0].astype(jnp.float32)
                        for stacked in (stacked_keys, stacked_values))
        scores = jnp.einsum("bkgth,bksh->bkgts", grouped, keys)
        mask = cache_mask(cfg, lengths, 1, DECODE_BLOCK, j * DECODE_BLOCK)[:, :, None]
        scores = jnp.where(mask, scores, -jnp.inf)
        new_best = jnp.maximum(best, jnp.max(scores, axis=-1))
        weights = jnp.exp(scores - new_best[..., None])
        rescale = jnp.exp(best - new_best)
        return (new_best, total * rescale + jnp.sum(weights, -1),
                acc * rescale[..., None] + jnp.einsum("bkgts,bksh->bkgth", weights, values))

    shape = (batch, kv, group, 1)
    blocks = jnp.minimum(jnp.max(lengths), slots - 1) // DECODE_BLOCK + 1
    # Every row sees at least its own new token (in block 0 or later), so best is finite.
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros((*shape, width)))
    _, total, acc = jax.lax.fori_loop(0, blocks, block, init)
    return _ungrouped(acc / total[..., None]).astype(q.dtype)


# ----------------------------------------------------------------------------- modules


def _partitioned(init, axes):
    return nn.with_logical_partitioning(init, axes)


_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", _partitioned(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _lora_a_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    """Uniform in ±1/sqrt(fan_in), fan_in = every dim but the last (the rank)."""
    bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
    """x[..., *in] @ kernel[*in, *features] (+ bias[*features]), `in` = the last `contract` dims.

    The kernel is created in its full shape, so its logical axis names always match its rank.
    With `lora_rank > 0` it adds `lora_scale · dropout(x) @ lora_a[*in, r] @ lora_b[r, *features]`:
    float32 variables of the `lora` collection, B zero at init; dropout runs only when a
    `dropout` rng is given (the training forward). `cpu_backward` differentiates the product
    with `_project`'s backward (XLA:CPU's fastest).
    """

    features: tuple[int, ...]
    contract: int
    use_bias: bool
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...]
    dtype: Any
    param_dtype: Any
    lora_rank: int = 0
    lora_scale: float = 0.0
    lora_dropout: float = 0.0
    cpu_backward: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = x.shape[x.ndim - self.contract:]
        kernel = self.param("kernel", _partitioned(_KERNEL_INIT, self.kernel_axes),
                            in_shape + self.features, self.param_dtype)
        x_in, kernel_in = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.cpu_backward:
            y = _project(x_in, kernel_in, self.contract)
        else:
            dims = (_contracting(x.ndim, self.contract), ((), ()))
            y = jax.lax.dot_general(x_in, kernel_in, dims)
        if self.lora_rank:
            y = y + self._low_rank_update(x, in_shape)
        if self.use_bias:
            bias = self.param("bias", _partitioned(nn.initializers.zeros, self.bias_axes),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y

    def _low_rank_update(self, x: Array, in_shape: tuple[int, ...]) -> Array:
        """lora_scale · dropout(x) @ A @ B: [..., *features]."""
        a_axes = self.kernel_axes[:self.contract] + ("lora_rank",)
        b_axes = ("lora_rank",) + self.kernel_axes[self.contract:]
        a = self.variable("lora", "lora_a", lambda: _partitioned(_lora_a_init, a_axes)(
            self.make_rng("lora"), in_shape + (self.lora_rank,), jnp.float32)).value
        b = self.variable("lora", "lora_b", lambda: _partitioned(nn.initializers.zeros, b_axes)(
            self.make_rng("lora"), (self.lora_rank,) + self.features, jnp.float32)).value
        if self.lora_dropout and self.has_rng("dropout"):
            x = nn.Dropout(self.lora_dropout, deterministic=False)(x)
        down = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype),
                                   (_contracting(x.ndim, self.contract), ((), ())))
        down = down * jnp.asarray(self.lora_scale, self.dtype)
        # A size-1 batch dimension keeps this product out of what the `dots_no_batch` remat
        # policy saves: the backward pass recomputes it from the saved [..., r] input (cheap),
        # where saving it would double the stored projection outputs.
        up = jax.lax.dot_general(down[None], b.astype(self.dtype)[None],
                                 (((down.ndim,), (1,)), ((0,), (0,))))
        return up[0]


CPU_PROJECTION_BACKWARD = "cpu_projection_backward"  # the named scope of its ops in a program


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _project(x: Array, kernel: Array, contract: int) -> Array:
    """x [..., *in] @ kernel [*in, *out] -> [..., *out], `in` = x's last `contract` axes.

    The same math as autodiff's, with the backward that XLA's CPU backend runs fastest
    (`_project_bwd`). A remat policy that saves dots does not see the product inside, so
    `Linear` uses it only where nothing or everything is rematerialized."""
    return jax.lax.dot_general(x, kernel, (_contracting(x.ndim, contract), ((), ())))


def _contracting(ndim: int, contract: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """x's last `contract` axes against the kernel's first `contract` axes."""
    return tuple(range(ndim - contract, ndim)), tuple(range(contract))


def _project_fwd(x: Array, kernel: Array, contract: int):
    return _project(x, kernel, contract), (x, kernel)


def _project_bwd(contract: int, residuals: tuple[Array, Array], grad: Array):
    """(dx, dkernel) with x as rows [M, in] and grad as [M, out]: dx = grad @ kernelᵀ and
    dkernel = xᵀ @ grad.

    XLA's CPU backend otherwise feeds dkernel's product a transposed copy of `grad`, fused with
    whatever elementwise op made it (the SiLU's derivative, for gate_proj and up_proj), and that
    fused transposing loop ran 15x slower than the same op untransposed: 1.1 s of an SFT step of
    SmolLM2-135M at 4 x 256 (benchmarks/RESULTS.md). Transposing x on its own instead, kept
    apart by an optimization barrier so the simplifier cannot fold it back into the product,
    made the step about 20% faster.
    """
    x, kernel = residuals
    with jax.named_scope(CPU_PROJECTION_BACKWARD):
        fan_in = int(np.prod(kernel.shape[:contract]))
        rows = x.reshape(-1, fan_in)
        grad_rows = grad.reshape(rows.shape[0], -1)
        x_grad = jax.lax.dot_general(grad_rows, kernel.reshape(fan_in, -1),
                                     (((1,), (1,)), ((), ()))).reshape(x.shape)
        kernel_grad = jax.lax.optimization_barrier(rows.T) @ grad_rows
    return x_grad, kernel_grad.reshape(kernel.shape)


_project.defvjp(_project_fwd, _project_bwd)


def _dense(cfg: ModelConfig, features, contract: int, use_bias: bool, kernel_axes, bias_axes,
           name: str | None = None) -> Linear:
    features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
    lora = {}
    if cfg.lora_rank and name in cfg.lora_targets:
        lora = dict(lora_rank=cfg.lora_rank, lora_scale=cfg.lora_scale,
                    lora_dropout=cfg.lora_dropout)
    # Measured on a CPU only; elsewhere autodiff's backward stays.
    cpu_backward = compile_platform(cfg) == "cpu" and cfg.remat_policy in ("none", "full")
    return Linear(features, contract, use_bias, tuple(kernel_axes), tuple(bias_axes), cfg.dtype,
                  cfg.param_dtype, name=name, cpu_backward=cpu_backward, **lora)


class SelfAttention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array | None,
                 cache: tuple[Array, Array, Array] | None = None, layer: Array | None = None):
        """Returns (output, the updated cache or None).

        cache: (keys, values, lengths) of every layer ([L, B, K, S, H], int32[B]); this layer
        (`layer`, int32[]) writes row b's T new keys and values at slots lengths[b] ...
        lengths[b] + T - 1 in place (slots past S are dropped) and attends to its own slice.
        """
        cfg = self.cfg
        n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(cfg, (n, h), 1, cfg.qkv_bias, ("embed", "heads", "head_dim"),
                   ("heads", "head_dim"), "q_proj")(x)
        key = _dense(cfg, (k, h), 1, cfg.qkv_bias, ("embed", "kv_heads", "head_dim"),
                     ("kv_heads", "head_dim"), "k_proj")(x)
        value = _dense(cfg, (k, h), 1, cfg.qkv_bias, ("embed", "kv_heads", "head_dim"),
                       ("kv_heads", "head_dim"), "v_proj")(x)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "head_dim", name="q_norm")(q)
            key = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, "head_dim",
                          name="k_norm")(key)
        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
        if cache is None:
            out = attention(cfg, q, key, value, mask)
        else:
            stacked_keys, stacked_values, lengths = cache
            rows = jnp.arange(x.shape[0])[:, None]
            slots = lengths[:, None] + jnp.arange(x.shape[1])[None, :]
            stacked_keys, stacked_values = (
                nn.with_logical_constraint(stacked.at[layer, rows, :, slots].set(
                    new.astype(stacked.dtype), mode="drop"),
                    (None, "act_batch", "act_kv_heads", None, None))
                for stacked, new in zip((stacked_keys, stacked_values), (key, value)))
            out = cached_attention(cfg, q, stacked_keys, stacked_values, layer, lengths)
            cache = (stacked_keys, stacked_values, lengths)
        return _dense(cfg, cfg.hidden_size, 2, cfg.out_bias, ("heads", "head_dim", "embed"),
                      ("embed",), "o_proj")(out), cache


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        gate = _dense(cfg, cfg.intermediate_size, 1, cfg.mlp_bias, ("embed", "mlp"), ("mlp",),
                      "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, 1, cfg.mlp_bias, ("embed", "mlp"), ("mlp",),
                    "up_proj")(x)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up,
                                            ("act_batch", "act_length", "act_mlp"))
        return _dense(cfg, cfg.hidden_size, 1, cfg.mlp_bias, ("mlp", "embed"), ("embed",),
                      "down_proj")(hidden)


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, cos: Array, sin: Array, mask: Array | None,
                 layer: Array | None = None):
        """carry: (hidden [B, T, D], the stacked KV cache or None); returns (carry, None)."""
        x, cache = carry
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        normed = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="input_layernorm")(x)
        attended, cache = SelfAttention(cfg, name="self_attn")(
            normed, cos, sin, mask, cache, layer)
        x = x + attended
        normed = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype,
                         name="post_attention_layernorm")(x)
        x = x + MLP(cfg, name="mlp")(normed)
        return (x, cache), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _layer_stack(cfg: ModelConfig) -> type[nn.Module]:
    layer = DecoderLayer
    if cfg.remat_policy != "none":
        layer = nn.remat(layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    return nn.scan(
        layer, variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True, "lora": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.num_layers,
        unroll=cfg.scan_unroll, metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Decoder(nn.Module):
    """tokens int32[B, T] -> final hidden states [B, T, D]; `unembed` maps them to logits."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=_partitioned(_KERNEL_INIT, ("vocab", "embed")),
        )
        self.layers = _layer_stack(cfg)(cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size, 1, False, ("embed", "vocab"), ("vocab",))

    def __call__(self, tokens, positions=None, segment_ids=None):
        if positions is None:
            positions = (
                jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
                if segment_ids is None else segment_positions(segment_ids)
            )
        mask = None if segment_ids is None else segment_mask(segment_ids)
        cos, sin = rope_tables(self.cfg, positions)
        (x, _), _ = self.layers((self.embed_tokens(tokens), None), cos, sin, mask, None)
        return self.norm(x)

    def cached(self, tokens, cache: KVCache):
        """(hidden [B, T, D], cache) for T new tokens of each row b, at positions (and slots)
        lengths[b] ... lengths[b] + T - 1."""
        length = tokens.shape[1]
        positions = cache.lengths[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
        cos, sin = rope_tables(self.cfg, positions)
        # The cache rides in the scan's carry, so each layer updates its slots in place (as
        # scanned inputs and outputs, the whole cache would be copied at every step).
        layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
        (x, (keys, values, _)), _ = self.layers(
            (self.embed_tokens(tokens), (cache.keys, cache.values, cache.lengths)), cos, sin,
            None, layers)
        return self.norm(x), KVCache(keys, values, cache.lengths + length)

    def embed(self, tokens):
        return self.embed_tokens(tokens)

    def final_norm(self, x):
        return self.norm(x)

    def unembed(self, hidden):
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(hidden.astype(self.cfg.dtype))
        return self.lm_head(hidden)

    def init_all(self, tokens):
        return self.unembed(self(tokens))


# ----------------------------------------------------------------------------- pure functions


def _boxed_variables(cfg: ModelConfig, rng: Array) -> PyTree:
    """{"params": ..., "lora": ... (with adapters)} as boxed (logically partitioned) arrays."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    rngs = {"params": rng}
    if cfg.lora_rank:  # a stream of its own, so the params equal those of the rank-0 model
        rngs["lora"] = jax.random.fold_in(rng, 1)
    return Decoder(cfg).init(rngs, tokens, method=Decoder.init_all)


def _boxed_init(cfg: ModelConfig, rng: Array) -> PyTree:
    return _boxed_variables(cfg, rng)["params"]


def _boxed_lora(cfg: ModelConfig, rng: Array) -> PyTree:
    return _boxed_variables(cfg, rng).get("lora", {})


@functools.partial(jax.jit, static_argnums=0)
def init(cfg: ModelConfig, rng: Array) -> PyTree:
    """Random params (HF-style normal(0.02) kernels, unit norms) as a plain pytree of arrays.

    They do not depend on cfg's LoRA fields; the adapters come from `init_lora`. Jitted: op by
    op, Flax's init compiled about 90 small programs.
    """
    return nn.unbox(_boxed_init(cfg, rng))


def param_shapes(cfg: ModelConfig) -> PyTree:
    """jax.ShapeDtypeStruct pytree of the params, computed without allocating them."""
    return nn.unbox(jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0)))


def param_logical_axes(cfg: ModelConfig) -> PyTree:
    """PartitionSpec pytree of logical axis names, e.g. ('layers', 'embed', 'heads', 'head_dim')."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def init_lora(cfg: ModelConfig, rng: Array) -> PyTree:
    """Fresh float32 adapters of every targeted projection ({} when cfg.lora_rank == 0):
    {"layers": {"self_attn": {"q_proj": {"lora_a": [L, D, r], "lora_b": [L, r, N, H]}, ...}}}.

    lora_a is uniform in ±1/sqrt(fan_in), lora_b is zero. Run under jax.jit, the base params that
    Flax creates on the way are never materialized.
    """
    return nn.unbox(_boxed_lora(cfg, rng))


def lora_shapes(cfg: ModelConfig) -> PyTree:
    """jax.ShapeDtypeStruct pytree of the adapters, computed without allocating anything."""
    return nn.unbox(jax.eval_shape(functools.partial(_boxed_lora, cfg), jax.random.key(0)))


def lora_logical_axes(cfg: ModelConfig) -> PyTree:
    """PartitionSpec pytree of the adapters' logical axes: lora_a takes its kernel's input axes,
    lora_b its output axes, both a leading 'layers' and a 'lora_rank' axis."""
    boxed = jax.eval_shape(functools.partial(_boxed_lora, cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def _variables(cfg: ModelConfig, params: PyTree, lora: PyTree | None) -> dict:
    if not cfg.lora_rank:
        return {"params": params}
    if lora is None:
        raise ValueError(f"cfg has LoRA adapters (rank {cfg.lora_rank}) but no lora= tree was "
                         "passed; pass the adapters, or run adapters_off(cfg) for the base model")
    return {"params": params, "lora": lora}


def _rngs(dropout_rng: Array | None) -> dict | None:
    return None if dropout_rng is None else {"dropout": dropout_rng}


def hidden_states(cfg: ModelConfig, params: PyTree, tokens: Array, positions: Array | None = None,
                  segment_ids: Array | None = None, *, lora: PyTree | None = None,
                  dropout_rng: Array | None = None) -> Array:
    """Final-norm hidden states dtype[B, T, D] for tokens int32[B, T].

    positions: int32[B, T] or None (0..T-1, or restarting at each segment when segment_ids is
    given). segment_ids: int32[B, T] or None; tokens attend only to earlier tokens of the same
    segment id (packed sequences). lora: the adapters (`init_lora`), required when
    cfg.lora_rank > 0 and ignored otherwise. dropout_rng: a key to apply cfg.lora_dropout
    (training); None = no dropout.
    """
    return Decoder(cfg).apply(_variables(cfg, params, lora), tokens, positions, segment_ids,
                              rngs=_rngs(dropout_rng))


def unembed(cfg: ModelConfig, params: PyTree, hidden: Array) -> Array:
    """Logits dtype[..., V] for hidden[..., D] (the tied embedding or the lm_head)."""
    shared = {key: value for key, value in params.items() if key != "layers"}
    return Decoder(adapters_off(cfg)).apply({"params": shared}, hidden, method=Decoder.unembed)


def output_embedding(cfg: ModelConfig, params: PyTree) -> Array:
    """The unembedding matrix [D, V] as stored (embedding transposed when tied)."""
    if cfg.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def hidden_cached(cfg: ModelConfig, params: PyTree, tokens: Array, cache: KVCache, *,
                  lora: PyTree | None = None) -> tuple[Array, KVCache]:
    """Final-norm hidden states dtype[B, T, D] of T new tokens per row attending to the cache,
    and the cache with them written: row b's at slots (= positions) cache.lengths[b] onward.

    tokens: int32[B, T]. A right-padded prompt writes its padding too; set the rows' lengths
    to the real lengths afterwards (`cache._replace(lengths=...)`) and later tokens overwrite
    it. params may be `split_layers(params)` (the layers run one by one). lora: as in
    `hidden_states`.
    """
    if isinstance(params["layers"], tuple):
        return _hidden_cached_by_layer(cfg, params, tokens, cache, lora)
    return Decoder(cfg).apply(_variables(cfg, params, lora), tokens, cache,
                              method=Decoder.cached)


def split_layers(params: PyTree) -> PyTree:
    """`params` with the stacked layers as a tuple of per-layer trees (a copy of the layer
    weights). `hidden_cached` then runs the layers one by one on their own arrays: under a
    scan each decode step slices every layer's weights out of the stack, which XLA's CPU
    backend does by copying them, on top of the reads the step needs."""
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda x, i=i: x[i], layers)
                                      for i in range(count))}


def _hidden_cached_by_layer(cfg, params, tokens, cache, lora):
    shared = {key: value for key, value in params.items() if key != "layers"}
    decoder = Decoder(adapters_off(cfg))
    length = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    cos, sin = rope_tables(cfg, positions)
    carry = (decoder.apply({"params": shared}, tokens, method=Decoder.embed),
             (cache.keys, cache.values, cache.lengths))
    layer = DecoderLayer(cfg)
    for index, layer_params in enumerate(params["layers"]):
        variables = {"params": layer_params}
        if cfg.lora_rank:
            variables["lora"] = jax.tree.map(lambda x, i=index: x[i], lora["layers"])
        carry, _ = layer.apply(variables, carry, cos, sin, None, jnp.int32(index))
    x, (keys, values, _) = carry
    hidden = decoder.apply({"params": shared}, x, method=Decoder.final_norm)
    return hidden, KVCache(keys, values, cache.lengths + length)


def forward(cfg: ModelConfig, params: PyTree, tokens: Array, positions: Array | None = None,
            segment_ids: Array | None = None, *, lora: PyTree | None = None,
            dropout_rng: Array | None = None) -> Array:
    """Logits dtype[B, T, V] for tokens int32[B, T]; see `hidden_states` for the other inputs."""
    hidden = hidden_states(cfg, params, tokens, positions, segment_ids, lora=lora,
                           dropout_rng=dropout_rng)
    return unembed(cfg, params, hidden)

