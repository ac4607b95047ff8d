"""The DASD training step, read top to bottom like the method (docs/method.md, stage 2):

1. signals: the frozen base's confidence in every target (a bf16 forward under stop_gradient;
   read from the batch when `base_confidence="cached"`, skipped when the rule needs no base),
   and the trainee's own, without gradient, for the rules that use it (rho1, dft, current);
2. selection: per-token weights from `selection.select` over the whole batch;
3. masked cross-entropy of the trainee, accumulated over micro-batches with one batch-wide
   normalizer, so accumulation changes memory, not the result;
4. AdamW update with global-norm clipping, warmup + cosine schedule; metrics.

Every baseline is this step with a different `config.selection.rule`.

With LoRA (`config.lora.rank > 0`) the state trains the adapters alone (optimizer moments for
them only) and `base_params` holds the frozen weights: the trainee runs them with its adapters,
the base forward of step 1 runs the very same arrays with the adapters off, so no second copy
of the model exists.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from dasd_jax import lora, losses, model, run_config, selection, sharding, signals
from dasd_jax.metrics import step_flops

Array = jax.Array
PyTree = Any
BATCH_KEYS = signals.BATCH_KEYS


@flax.struct.dataclass
class TrainState:
    step: Array  # int32[]
    params: PyTree  # what is trained: every param, or with LoRA the adapters alone
    opt_state: PyTree
    rng: Array  # uint32[2], a raw PRNG key; step k uses fold_in(rng, k)


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(train: Any) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine to `learning_rate * end_lr_ratio`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=train.warmup_steps,
        decay_steps=train.steps, end_value=train.learning_rate * train.end_lr_ratio,
    )


def _decays(params: PyTree) -> PyTree:
    """Weight decay on matrices (kernels, embeddings, LoRA adapters), not on norms and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in (
            "kernel", "embedding", "lora_a", "lora_b"), params)


def make_optimizer(train: Any) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip),
        optax.adamw(learning_rate_schedule(train), b1=train.b1, b2=train.b2, eps=train.eps,
                    weight_decay=train.weight_decay, mask=_decays),
    )


# ----------------------------------------------------------------------------- state and shardings


def uses_lora(config: Any) -> bool:
    """Whether the run trains LoRA adapters on a frozen base instead of every weight."""
    return config.lora.rank > 0


def trainee_config(config: Any, cfg: model.ModelConfig) -> model.ModelConfig:
    """The trainee's ModelConfig under `config.model` numerics and `config.lora` adapters."""
    return cfg.replace(param_dtype=config.model.param_dtype, dtype=config.model.compute_dtype,
                       remat_policy=config.model.remat_policy,
                       attention_impl=config.model.attention_impl,
                       **lora.model_fields(config.lora))


def frozen_base_config(config: Any, cfg: model.ModelConfig) -> model.ModelConfig:
    """The frozen base's ModelConfig, no remat, computed in `train.base_dtype`: a copy stored in
    that dtype, or with LoRA the trainee's own weights (stored in `model.param_dtype`, cast per
    operation) with the adapters off."""
    if uses_lora(config):
        return model.adapters_off(cfg).replace(
            param_dtype=config.model.param_dtype, dtype=config.train.base_dtype,
            remat_policy="none", attention_impl=config.model.attention_impl)
    return cfg.replace(param_dtype=config.train.base_dtype, dtype=config.train.base_dtype,
                       remat_policy="none", attention_impl=config.model.attention_impl)


def uses_base_model(config: Any) -> bool:
    """Whether the step runs the frozen base forward."""
    return config.train.base_confidence != "cached" and "base" in selection.needs(
        config.selection.rule, config.selection)


def needs_base_params(config: Any) -> bool:
    """Whether the step takes frozen weights: for the base forward, or as LoRA's base."""
    return uses_lora(config) or uses_base_model(config)


# ----------------------------------------------------------------------------- the step


def _micro_batches(batch: dict, count: int) -> dict:
    """[B, ...] -> [count, B // count, ...]; micro-batch i holds examples i, i+count, ... so each
    keeps the batch's device layout."""
    def split(x):
        return x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def _target_stats(cfg, params, batch, chunk, stats, adapters=None, dropout_rng=None):
    hidden = model.hidden_states(cfg, params, batch["tokens"], lora=adapters,
                                 dropout_rng=dropout_rng)
    return losses.token_stats(hidden, model.output_embedding(cfg, params), batch["targets"],
                              chunk=chunk, stats=stats)


def _trainee_weights(config, trainable, base_params):
    """(params, adapters) of the trainee forward: the trainable params alone (base_params, if
    any, are the base forward's own copy), or with LoRA the frozen base params and the
    trainable adapters."""
    return (base_params, trainable) if uses_lora(config) else (trainable, None)


def _signals(config, cfg, base_cfg, params, base_params, batch) -> selection.Signals:
    """Signals of one micro-batch: every field float32[b, T] (None when the rule needs none)."""
    rule, chunk = config.selection.rule, config.train.loss_chunk
    needed = selection.needs(rule, config.selection)
    recorded = [name for name in signals.TRAINED
                if name not in signals.BASE or config.train.base_confidence == "cached"]
    found = {key: batch[key] for key in (*signals.MASKS, *recorded)}
    if config.train.base_confidence != "cached" and "base" in needed:
        stats = _target_stats(base_cfg, base_params, batch, chunk, ("logprob", "top1"))
        found.update({f"base_{k}": jax.lax.stop_gradient(v) for k, v in stats.items()})
    if "trainee" in needed:
        trainee_params, adapters = _trainee_weights(config, params, base_params)
        stats = _target_stats(cfg, trainee_params, batch, chunk, ("logprob", "top1"), adapters)
        found.update({f"trainee_{k}": jax.lax.stop_gradient(v) for k, v in stats.items()})
    return selection.Signals(**found)


def _selection_metrics(config, signals: selection.Signals, weights: Array) -> dict[str, Array]:
    mask = signals.loss_mask
    responses = jnp.maximum(jnp.sum(mask), 1)
    fraction = lambda m: jnp.sum(m & mask) / responses
    metrics = {"kept_ratio": fraction(weights > 0), "response_tokens": jnp.sum(mask)}
    if signals.base_logprob is not None:
        metrics["high_ppl_10"] = fraction(signals.base_logprob < jnp.log(0.1))
        metrics["high_ppl_100"] = fraction(signals.base_logprob < jnp.log(0.01))
    confidence_known = (signals.trainee_logprob if config.selection.confidence_model == "current"
                        else signals.base_logprob) is not None
    if confidence_known:
        groups = selection.categories(signals, config.selection)
        metrics.update({name: fraction(groups[name])
                        for name in ("aligned", "correction", "drift", "structural")})
        metrics["kept_high_ppl"] = fraction((weights > 0) & (groups["correction"]
                                                             | groups["drift"]))
        metrics["tau"] = groups["tau"]
    return metrics


def _loss_and_metrics_fn(config: Any, cfg: model.ModelConfig):
    """The step's two halves: `signals_and_weights(params, base_params, micro, rng)` over the
    whole batch, and `micro_loss(params, micro, weights, normalizer, base_params, dropout_rng)`
    of one micro-batch, differentiable in `params` (the trainable ones)."""
    base_cfg = frozen_base_config(config, cfg)
    rule = config.selection.rule

    def signals_and_weights(params, base_params, micro, rng):
        signals = jax.lax.map(lambda mb: _signals(config, cfg, base_cfg, params, base_params, mb),
                              micro)
        weights = selection.select(rule, signals, config.selection, rng)
        if config.train.loss_normalization == "selected":
            normalizer = jnp.sum(weights)
        else:
            normalizer = jnp.sum(signals.loss_mask).astype(jnp.float32)
        return signals, weights, normalizer

    def micro_loss(params, micro, weights, normalizer, base_params=None, dropout_rng=None):
        trainee_params, adapters = _trainee_weights(config, params, base_params)
        logprob = _target_stats(cfg, trainee_params, micro, config.train.loss_chunk, ("logprob",),
                                adapters, dropout_rng)["logprob"]
        response_logprob = jnp.sum(jnp.where(micro["loss_mask"], logprob, 0.0))
        return losses.masked_cross_entropy(logprob, weights, normalizer), response_logprob

    return signals_and_weights, micro_loss


# ----------------------------------------------------------------------------- the set-up


@dataclasses.dataclass(frozen=True, eq=False)
class StepSetup:
    """Everything a run's step needs, built once by `setup` (the trainer, evaluation, the
    benchmarks and the tests all take it from there): the configs, the optimizer and schedule,
    every sharding, the jitted train and eval steps, the FLOPs of a step.

    config: the run's resolved, frozen config; trainee / base: the ModelConfigs of the trained
    model and of the frozen base forward.
    """

    config: Any
    trainee: model.ModelConfig
    base: model.ModelConfig
    mesh: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: TrainState
    base_shardings: PyTree | None
    batch_shardings: dict

    @property
    def lora(self) -> bool:
        return uses_lora(self.config)

    @property
    def base_forward(self) -> bool:
        """Whether the step runs the frozen base forward."""
        return uses_base_model(self.config)

    @property
    def trainee_forward(self) -> bool:
        """Whether the rule needs an extra trainee forward without gradient (rho1, dft)."""
        return "trainee" in selection.needs(self.config.selection.rule, self.config.selection)

    def trainable_shapes(self) -> PyTree:
        """ShapeDtypeStructs of TrainState.params: every param, or with LoRA the adapters."""
        return model.lora_shapes(self.trainee) if self.lora else model.param_shapes(self.trainee)

    def init_state(self, params: PyTree) -> TrainState:
        """A step-0 TrainState around `params` (cast to `config.model.param_dtype`).

        With LoRA the state holds fresh adapters instead (seeded by `config.seed`; B = 0, so
        the trainee starts as the base) and `params` is not used: it is the frozen base that
        `base_params` passes to the step.
        """
        seed, tx = self.config.seed, self.optimizer

        def build(trainable):
            return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                              opt_state=tx.init(trainable), rng=jax.random.PRNGKey(seed))

        if self.lora:
            _, adapter_key = jax.random.split(jax.random.PRNGKey(seed))
            return jax.jit(lambda key: build(model.init_lora(self.trainee, key)),
                           out_shardings=self.state_shardings)(adapter_key)
        dtype = self.trainee.param_dtype
        return jax.jit(lambda p: build(jax.tree.map(lambda x: x.astype(dtype), p)),
                       out_shardings=self.state_shardings)(params)

    def base_params(self, params: PyTree) -> PyTree | None:
        """The frozen weights the step reads, or None when it needs none.

        Full fine-tuning: a `train.base_dtype` copy of the initial params for the base forward.
        LoRA: `params` themselves in `model.param_dtype`, the trainee's base and the base model
        at once; arrays already in that dtype and sharding are passed on, not copied.
        """
        if self.base_shardings is None:
            return None
        dtype = self.base.param_dtype
        if self.lora:
            return jax.tree.map(
                lambda x, s: jax.device_put(x if x.dtype == dtype else x.astype(dtype), s),
                params, self.base_shardings)
        return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                       out_shardings=self.base_shardings)(params)

    def place(self, batch: dict) -> dict:
        """The step's inputs from a host batch (every process holds it whole): each [B, T]
        array split over the mesh's batch axes."""
        return {key: sharding.place(batch[key], self.batch_shardings[key]) for key in BATCH_KEYS}

    def trained_model(self, trainable: PyTree,
                      base_params: PyTree | None) -> tuple[model.ModelConfig, PyTree]:
        """(cfg, params) of the trained model as a plain one, from the trained params
        (`TrainState.params`): with LoRA the adapters merged into the frozen base (one new array
        per targeted kernel), otherwise those params themselves."""
        if self.lora:
            return (model.adapters_off(self.trainee),
                    lora.merge(self.trainee, base_params, trainable))
        return self.trainee, trainable

    def flops(self, batch_size: int, seq_len: int) -> float:
        """Model FLOPs of one step on a [batch_size, seq_len] batch (metrics.step_flops)."""
        return step_flops(self.trainee, batch_size, seq_len,
                          base_forward=self.base_forward,
                          extra_trainee_forward=self.trainee_forward,
                          weight_grads=not self.lora)

    def abstract_inputs(self, batch_size: int, seq_len: int):
        """ShapeDtypeStructs (with shardings) of the train step's (state, base, batch)."""
        with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        trainable = self.trainable_shapes()
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trainable,
                           opt_state=jax.eval_shape(self.optimizer.init, trainable),
                           rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
        base = (None if self.base_shardings is None else
                jax.tree.map(with_sharding, model.param_shapes(self.base), self.base_shardings))
        batch = {key: jax.ShapeDtypeStruct((batch_size, seq_len), signals.BATCH_DTYPES[key],
                                           sharding=self.batch_shardings[key])
                 for key in BATCH_KEYS}
        return jax.tree.map(with_sharding, state, self.state_shardings), base, batch

    def weight_bytes(self) -> int:
        """Bytes of the trainable params, optimizer state and frozen base params, all devices
        together (what stays in memory between steps, activations aside)."""
        size = lambda tree: sum(x.size * jnp.dtype(x.dtype).itemsize
                                for x in jax.tree.leaves(tree))
        trainable = self.trainable_shapes()
        base = model.param_shapes(self.base) if self.base_shardings is not None else {}
        return size(trainable) + size(jax.eval_shape(self.optimizer.init, trainable)) + size(base)

    @functools.cached_property
    def train_step(self) -> Callable:
        """`train_step(state, base_params, batch) -> (state, metrics)`, jitted on the mesh.

        batch: `place(host_batch)` of a `data.Batches` batch (the keys of BATCH_KEYS);
        base_params: `base_params(...)` (None when unused). The state is donated. metrics:
        float32 scalars (loss, response_nll, kept_ratio, high_ppl_10/100, aligned / correction
        / drift / structural fractions, kept_high_ppl (kept tokens with b < tau), tau,
        grad_norm, learning_rate, response_tokens, and nonfinite: 1 when the loss or gradient
        was not finite, in which case the update was skipped).
        """
        return self._jit(_train_step(self), donate_state=True)

    @functools.cached_property
    def eval_step(self) -> Callable:
        """`eval_step(state, base_params, batch) -> metrics`: the train step's loss and selection
        metrics on a batch, without an update (the random rule uses a fixed key)."""
        return self._jit(_eval_step(self), donate_state=False)

    def _jit(self, fn, *, donate_state: bool):
        replicated = NamedSharding(self.mesh, PartitionSpec())
        outputs = (self.state_shardings, replicated) if donate_state else replicated
        return sharding.MeshJit(
            fn, self.mesh, self.config.mesh.rules,
            in_shardings=(self.state_shardings, self.base_shardings, self.batch_shardings),
            out_shardings=outputs, donate_argnums=(0,) if donate_state else ())


def setup(config: Any, cfg: model.ModelConfig, mesh) -> StepSetup:
    """The StepSetup of a run: `cfg` is the loaded model's ModelConfig (as `hf.load` gives it);
    `config` is resolved and frozen here (for `mesh`'s shape) unless it was
    (`run_config.resolve`), so the jitted steps close over frozen values only."""
    if not config.get(run_config.RESOLVED):
        config = run_config.resolve(
            run_config.replaced_fields(config, {"mesh.shape": tuple(mesh.devices.shape)}))
    trainee, base = trainee_config(config, cfg), frozen_base_config(config, cfg)
    rules = config.mesh.rules
    optimizer = make_optimizer(config.train)
    if uses_lora(config):
        trainable, trainable_shardings = (model.lora_shapes(trainee),
                                          sharding.lora_shardings(trainee, mesh, rules))
    else:
        trainable, trainable_shardings = (model.param_shapes(trainee),
                                          sharding.param_shardings(trainee, mesh, rules))
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = optax.tree_map_params(
        optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, trainable), trainable_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
    return StepSetup(
        config=config, trainee=trainee, base=base, mesh=mesh, optimizer=optimizer,
        schedule=learning_rate_schedule(config.train),
        state_shardings=TrainState(step=replicated, params=trainable_shardings,
                                   opt_state=opt_state, rng=replicated),
        base_shardings=(sharding.param_shardings(base, mesh, rules)
                        if needs_base_params(config) else None),
        batch_shardings={key: sharding.batch_sharding(mesh) for key in BATCH_KEYS})


def _train_step(run: StepSetup) -> Callable:
    config, cfg, tx = run.config, run.trainee, run.optimizer
    signals_and_weights, micro_loss = _loss_and_metrics_fn(config, cfg)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    dropout = run.lora and config.lora.dropout > 0

    def train_step(state: TrainState, base_params, batch):
        micro = _micro_batches({k: batch[k] for k in BATCH_KEYS}, config.train.micro_batches)
        rng = jax.random.fold_in(state.rng, state.step)
        signals, weights, normalizer = signals_and_weights(state.params, base_params, micro, rng)
        dropout_rngs = (jax.random.split(jax.random.fold_in(rng, 1), config.train.micro_batches)
                        if dropout else None)

        def accumulate(carry, xs):
            loss_sum, logprob_sum, grad_sum = carry
            (loss, logprob), grads = grad_fn(state.params, xs[0], xs[1], normalizer,
                                             base_params, xs[2])
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (loss_sum + loss, logprob_sum + logprob, grad_sum), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (loss, logprob_sum, grads), _ = jax.lax.scan(
            accumulate, (jnp.zeros(()), jnp.zeros(()), zeros), (micro, weights, dropout_rngs))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient skips the update: the state (and so every checkpoint)
        # stays the last finite one while the host, which sees the flag a step later, stops.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)

        metrics = _selection_metrics(config, signals, weights)
        metrics.update(loss=loss, grad_norm=grad_norm, learning_rate=run.schedule(state.step),
                       nonfinite=(~finite).astype(jnp.float32),
                       response_nll=-logprob_sum / jnp.maximum(metrics["response_tokens"], 1))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def _eval_step(run: StepSetup) -> Callable:
    config = run.config
    signals_and_weights, micro_loss = _loss_and_metrics_fn(config, run.trainee)

    def eval_step(state: TrainState, base_params, batch):
        micro = _micro_batches({k: batch[k] for k in BATCH_KEYS}, config.train.micro_batches)
        signals, weights, normalizer = signals_and_weights(
            state.params, base_params, micro, jax.random.PRNGKey(0))
        losses_and_logprobs = jax.lax.map(
            lambda xs: micro_loss(state.params, xs[0], xs[1], normalizer, base_params),
            (micro, weights))
        metrics = _selection_metrics(config, signals, weights)
        metrics.update(loss=jnp.sum(losses_and_logprobs[0]),
                       response_nll=-jnp.sum(losses_and_logprobs[1])
                       / jnp.maximum(metrics["response_tokens"], 1))
        return metrics

    return eval_step
