"""LoRA: adapters on a frozen base that is also DASD's base model, merged or PEFT exports."""

import contextlib
import io
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals
from safetensors.numpy import load_file

from dasd_jax import config_defaults, evaluate, hf, lora, model, sharding, loading, step, train
from dasd_jax.errors import UserError
from configs import math as math_config
from tests import tiny_models
from tests.test_step import CFG as STEP_CFG
from tests.test_step import make_batch, make_config

RANK, ALPHA = 4, 8.0
TOKENS = tiny_models.random_tokens(2, 48)

forward = jax.jit(model.forward, static_argnums=0)
init_lora = jax.jit(model.init_lora, static_argnums=0)


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def with_lora(cfg, targets=model.LORA_TARGETS):
    return cfg.replace(lora_rank=RANK, lora_alpha=ALPHA, lora_targets=targets)


def trained_looking_adapters(cfg, seed=1):
    """Adapters with a nonzero B, as after training, so that they change the logits."""
    leaves, tree = jax.tree.flatten(init_lora(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [x + 0.05 * rng.standard_normal(x.shape, np.float32)
                                     for x in leaves])


@pytest.fixture(scope="module")
def llama(checkpoint_dir):
    """(directory, cfg with LoRA on every projection, params, adapters) of the tiny llama."""
    directory = checkpoint_dir("llama")
    cfg, params = hf.load(directory, dtype=jnp.float32)
    cfg = with_lora(cfg)
    return directory, cfg, params, trained_looking_adapters(cfg)


@pytest.fixture(scope="module")
def step_params():
    return model.init(STEP_CFG, jax.random.key(0))


def adapted_logits(llama):
    _, cfg, params, adapters = llama
    return forward(cfg, params, jnp.asarray(TOKENS), lora=adapters)


# ----------------------------------------------------------------------------- the model


@pytest.mark.slow
def test_adapters_off_is_the_base_forward_bit_for_bit(llama):
    _, cfg, params, adapters = llama
    base = forward(model.adapters_off(cfg), params, jnp.asarray(TOKENS))
    plain = forward(cfg.replace(lora_rank=0, lora_targets=()), params, jnp.asarray(TOKENS))
    np.testing.assert_array_equal(base, plain)
    fresh = init_lora(cfg, jax.random.key(0))  # B = 0: the adapted model is the base
    np.testing.assert_array_equal(forward(cfg, params, jnp.asarray(TOKENS), lora=fresh), base)
    assert max_abs_diff(adapted_logits(llama), base) > 1e-2  # the test adapters do matter


@pytest.mark.slow
def test_lora_params_are_a_separate_tree_stacked_and_sharded_like_their_kernels(llama):
    _, cfg, params, adapters = llama
    jax.tree.map(np.testing.assert_array_equal, model.init(cfg, jax.random.key(3)),
                 model.init(model.adapters_off(cfg), jax.random.key(3)))
    q = adapters["layers"]["self_attn"]["q_proj"]
    o = adapters["layers"]["self_attn"]["o_proj"]
    assert q["lora_a"].shape == (cfg.num_layers, cfg.hidden_size, RANK)
    assert q["lora_b"].shape == (cfg.num_layers, RANK, cfg.num_heads, cfg.head_dim)
    assert o["lora_a"].shape == (cfg.num_layers, cfg.num_heads, cfg.head_dim, RANK)
    assert sum(x.size for x in jax.tree.leaves(adapters)) == cfg.num_lora_params
    axes = model.lora_logical_axes(cfg)["layers"]["self_attn"]["q_proj"]
    assert axes["lora_a"] == jax.sharding.PartitionSpec("layers", "embed", "lora_rank")
    mesh = sharding.make_mesh((1, 4, 2))
    spec = sharding.lora_shardings(cfg, mesh)["layers"]["self_attn"]["q_proj"]
    assert spec["lora_a"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert spec["lora_b"].spec == jax.sharding.PartitionSpec(None, None, "tensor", None)


def saved_activation_elements(loss, argument) -> int:
    """Elements of the activations that reverse mode saves for loss(argument)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(loss, argument)
    lines = [line for line in printed.getvalue().splitlines()
             if "from the argument" not in line and "from a constant" not in line]
    shapes = [re.match(r"\w+\[([\d,]*)\]", line).group(1) for line in lines]
    return sum(math.prod(int(d) for d in shape.split(",") if d) for shape in shapes)


@pytest.mark.slow
def test_under_dots_remat_the_adapters_add_only_rank_sized_saved_activations(step_params):
    cfg = STEP_CFG.replace(dtype="bfloat16", remat_policy="dots_no_batch")
    adapted = with_lora(cfg)
    tokens = jnp.zeros((2, 40), jnp.int32)
    full = saved_activation_elements(
        lambda p: jnp.sum(model.hidden_states(cfg, p, tokens), dtype=jnp.float32), step_params)
    with_adapters = saved_activation_elements(
        lambda a: jnp.sum(model.hidden_states(adapted, step_params, tokens, lora=a),
                          dtype=jnp.float32),
        init_lora(adapted, jax.random.key(1)))
    assert with_adapters <= full + len(model.LORA_TARGETS) * cfg.num_layers * 2 * 40 * RANK


# ----------------------------------------------------------------------------- exports


@pytest.mark.slow
def test_merged_export_computes_the_adapted_forward(llama, tmp_path):
    directory, cfg, params, adapters = llama
    adapted = adapted_logits(llama)
    merged = hf.save(tmp_path / "merged", cfg, params, lora=adapters, dtype=jnp.float32)

    reloaded_cfg, reloaded = hf.load(merged)
    assert reloaded_cfg == hf.load(directory)[0]  # an ordinary checkpoint of the same model
    assert max_abs_diff(forward(reloaded_cfg, reloaded, jnp.asarray(TOKENS)), adapted) <= 1e-5
    assert max_abs_diff(tiny_models.torch_logits(merged, TOKENS), adapted) <= 1e-4  # HF parity
    in_memory = lora.merge(cfg, params, adapters)
    jax.tree.map(np.testing.assert_array_equal, in_memory, reloaded)


def test_adapters_save_in_peft_layout_and_apply_as_peft_applies_them(llama, tmp_path):
    directory, cfg, params, adapters = llama
    saved = hf.save_adapters(tmp_path / "adapters", cfg, adapters, base_model=str(directory))
    config = json.loads((saved / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA", "CAUSAL_LM", RANK, ALPHA)
    assert sorted(config["target_modules"]) == sorted(model.LORA_TARGETS)
    assert config["base_model_name_or_path"] == str(directory)
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(model.LORA_TARGETS) * cfg.num_layers
    q_out, d = cfg.num_heads * cfg.head_dim, cfg.hidden_size
    prefix = "base_model.model.model.layers.1.self_attn."
    assert tensors[prefix + "q_proj.lora_A.weight"].shape == (RANK, d)
    assert tensors[prefix + "q_proj.lora_B.weight"].shape == (q_out, RANK)
    assert tensors[prefix + "o_proj.lora_A.weight"].shape == (RANK, q_out)

    # W + alpha/r · B·A on the torch model, as PEFT computes it, gives the adapted logits.
    torch_model = tiny_models.make_tiny_model("llama")
    with torch.no_grad():
        for name, weight in torch_model.named_parameters():
            key = "base_model.model." + name.removesuffix(".weight")
            if key + ".lora_A.weight" in tensors:
                a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
                weight += torch.from_numpy((ALPHA / RANK) * (b @ a))
    adapted = adapted_logits(llama)
    assert max_abs_diff(tiny_models.torch_logits(torch_model, TOKENS), adapted) <= 1e-4

    peft = pytest.importorskip("peft")  # optional: PEFT itself loads the directory
    base_model = tiny_models.make_tiny_model("llama")
    peft_model = peft.PeftModel.from_pretrained(base_model, str(saved)).eval()
    assert max_abs_diff(tiny_models.torch_logits(peft_model, TOKENS), adapted) <= 1e-4


# ----------------------------------------------------------------------------- training


def lora_config(**lora_settings):
    config = make_config("dasd")
    config.lora.update(rank=RANK, alpha=ALPHA, **lora_settings)
    return config


@pytest.mark.slow
def test_lora_training_changes_only_the_adapters_and_the_loss_falls(step_params):
    mesh = sharding.make_mesh((1, 2, 4))  # adapters sharded like their kernels
    config = lora_config()
    run = step.setup(config, STEP_CFG, mesh)
    base, state = run.base_params(step_params), run.init_state(step_params)
    assert jax.tree.structure(state.params) == jax.tree.structure(model.lora_shapes(run.trainee))
    optimizer_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert optimizer_size <= 2 * run.trainee.num_lora_params + 4  # moments of the adapters only

    train_step = run.train_step
    batch = run.place(make_batch(0))
    history = []
    for _ in range(5):
        state, metrics = train_step(state, base, batch)
        history.append(jax.device_get(metrics))
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    # The base confidences come from the frozen weights with the adapters off: unchanged.
    for name in ("high_ppl_10", "aligned", "tau"):
        assert len({float(m[name]) for m in history}) == 1, name
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), step_params)


@pytest.mark.slow
def test_the_lora_base_is_the_loaded_weights_not_a_copy(step_params):
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    params = jax.device_put(step_params, sharding.param_shardings(STEP_CFG, mesh))
    base = step.setup(lora_config(), STEP_CFG, mesh).base_params(params)
    kernel = lambda tree: tree["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel(base).unsafe_buffer_pointer() == kernel(params).unsafe_buffer_pointer()


def test_lora_rank_zero_is_full_fine_tuning_as_before(step_params):
    config = make_config("dasd")
    config.lora.update(rank=0, alpha=3.0, dropout=0.5, targets="q_proj")
    assert step.trainee_config(config, STEP_CFG) == step.trainee_config(make_config(), STEP_CFG)
    assert step.trainee_config(config, STEP_CFG).lora_rank == 0
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    state = step.setup(config, STEP_CFG, mesh).init_state(step_params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), step_params)


def test_unknown_lora_target_is_refused_naming_the_flag_and_the_choices():
    config = math_config.get_config("tiny")
    config.workdir = "/unused"
    config.lora.update(rank=8, targets="q_proj,qkv_proj")
    with pytest.raises(UserError, match=r"^--config.lora.targets: 'qkv_proj' is not a projection "
                                        r"LoRA can adapt; choose from q_proj,k_proj,v_proj,o_proj,"
                                        r"gate_proj,up_proj,down_proj$"):
        train.train(config)
    config.lora.update(targets="q_proj", dropout=1.0)
    with pytest.raises(UserError, match=r"^--config.lora.dropout=1.0: must lie in \[0.0, 1.0\)"):
        train.train(config)


@pytest.mark.slow
def test_dry_run_reports_the_memory_lora_saves(capsys):
    config = math_config.get_config("tiny")
    config.workdir = "/unused"
    config.dry_run = True
    config.lora.rank = RANK
    report = train.train(config)
    saving = report["lora"]
    trainee = step.trainee_config(config, loading.model_config_only(config))
    assert saving["trainable_params"] == trainee.num_lora_params > 0
    assert saving["weights_gib"] == report["weights_gib"]
    # Full fine-tuning keeps params + two moments + a base copy; LoRA one set of weights.
    assert saving["full_finetune_weights_gib"] > 3 * saving["weights_gib"] * 0.9
    assert saving["saved_gib"] > 0
    assert "trainable parameters" in capsys.readouterr().out


def losses_by_step(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_a_lora_run_checkpoints_adapters_resumes_and_exports_merged_and_peft(tmp_path):
    config = math_config.get_config("tiny")
    config.workdir = str(tmp_path)
    config.data.update(generated_examples=64, eval_path="", buckets=(256,))  # one compile
    config.train.update(steps=6, batch_size=8, log_every=1, warmup_steps=1)
    config.checkpoint.update(every=3, async_save=False)
    config.metrics.update(tensorboard=False, progress_bar=False)
    config.lora.update(rank=RANK, alpha=ALPHA, targets="q_proj,v_proj", dropout=0.1)
    train.train(config)
    uninterrupted = losses_by_step(tmp_path)
    assert uninterrupted[6] < uninterrupted[1]
    _, first_export = hf.load(tmp_path / "hf")
    cfg = step.trainee_config(config, loading.model_config_only(config))
    assert len(load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))) == (
        2 * 2 * cfg.num_layers)  # lora_A and lora_B of q_proj and v_proj in every layer
    saved = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / "6" / "state")
    saved_sizes = [math.prod(x.shape) for x in jax.tree.leaves(saved.item_metadata.tree)]
    assert sum(saved_sizes) <= 3 * cfg.num_lora_params + 8  # adapters, moments, counters

    # Interrupted after step 3: the resumed run repeats steps 4-6 and the export exactly.
    for path in (tmp_path / "checkpoints" / "6", tmp_path / "hf"):
        shutil.rmtree(path)
    train.train(config)
    assert losses_by_step(tmp_path) == uninterrupted
    _, export = hf.load(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, export, first_export)
    # Evaluating the workdir merges its latest adapters into the base, as the export did.
    mesh = sharding.make_mesh(config.mesh.shape)
    merged_cfg, merged, _ = evaluate.load_checkpoint(config, str(tmp_path), mesh)
    assert merged_cfg.lora_rank == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(merged), export)

    config.lora.rank = 0
    with pytest.raises(UserError, match=r"does not fit this run \(missing: .*--config.lora"):
        train.train(config)  # full fine-tuning cannot resume from adapters


def test_lora_settings_default_to_off():
    config = config_defaults.base_config()
    assert config.lora.rank == 0 and not step.uses_lora(config)
    assert lora.model_fields(config.lora) == {}
