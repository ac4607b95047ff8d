"""Every config field the trainer reads, with its default, and the variants every task config
shares (`--config=configs/TASK.py:tiny,sft`). `configs/*.py` start from `base_config()`.

Field names others rely on: `workdir`, `seed`, `mesh.shape`, `train.steps`, `train.log_every`,
`checkpoint.every`, `selection.rule`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dasd_jax import sharding, signals
from dasd_jax.errors import UserError


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = ""  # required: checkpoints, metrics.jsonl, TensorBoard logs, HF export
    config.seed = 0  # data order, random init, LoRA init, the random rule's draws
    # Compile every program of the pipeline for `compile_for` and say whether it fits, then exit
    # (dasd_jax/fit_check.py); nothing is loaded or run.
    config.dry_run = False
    # The hardware programs are compiled for: "" = this machine, or a TPU slice / GPU host that
    # need not be present: v5e:4x4, v6e:2x4, v5p:2x2x2, v4:2x2x2, h100x8, h200x8, a100x8
    # (dasd_jax/targets.py). Used by dry runs.
    config.compile_for = ""

    config.distributed = ml_collections.ConfigDict()  # multi-host start-up (dasd_jax/cli.py)
    # Multi-host runs (one process per host). TPU pods and SLURM jobs are detected by JAX
    # itself; for other GPU hosts give all three (launch/gpu_multihost.sh does).
    config.distributed.coordinator = ""  # "host:port" of process 0
    config.distributed.num_processes = 0  # how many processes the job has (with coordinator)
    config.distributed.process_id = -1  # this process's index, 0 ... num_processes - 1
    config.distributed.initialization_timeout = 300  # seconds to wait for every process

    config.model = ml_collections.ConfigDict()  # the model and its numerics
    config.model.path = ""  # HF checkpoint directory or hub id; "" = random init from model.random
    config.model.param_dtype = "float32"  # trainee params (and optimizer state) dtype
    config.model.compute_dtype = "bfloat16"  # activations and matrix inputs of the trainee
    config.model.remat_policy = "none"  # none | full | dots | dots_no_batch
    config.model.attention_impl = "auto"  # auto | xla | cudnn
    # The backend-specific paths (attention, the CPU projection backward, CPU decoding on split
    # layer weights) follow this platform: auto (compile_for's, else this machine's) | cpu | gpu
    # | tpu
    config.model.platform = "auto"
    # Used only when model.path is "": a random model of these dimensions with a character
    # tokenizer (see dasd_jax.char_tokenizer); saved with the export like any checkpoint.
    config.model.random = ml_collections.ConfigDict(dict(
        model_type="llama", hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True,
    ))
    # characters, or synthetic: that world's words and numbers whole (a registered tokenizer)
    config.model.random_tokenizer = "characters"

    config.mesh = ml_collections.ConfigDict()  # the device mesh (dasd_jax/sharding.py)
    config.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
    config.mesh.rules = sharding.LOGICAL_AXIS_RULES  # logical axis -> mesh axes

    config.data = ml_collections.ConfigDict()  # the training records and how they become tokens
    # JSONL file (or a directory of *.jsonl), a dataset saved with `datasets.save_to_disk`, or
    # "hf:NAME[:CONFIG]" for a Hugging Face hub dataset; "synthetic" = generated records
    # (tasks.synthetic).
    # "{workdir}" is replaced by --config.workdir: by default, what stage 1 wrote there.
    config.data.path = "{workdir}/rewrites.jsonl"
    config.data.split = "train"  # split for hf: / save_to_disk datasets
    config.data.eval_path = ""  # same forms; "" = no evaluation
    config.data.eval_split = "test"  # split of an hf: or save_to_disk eval_path
    config.data.eval_target = "reference"  # held-out loss is measured on the gold references
    config.data.generated_examples = 2048  # for path "synthetic"
    config.data.generated_eval_examples = 128  # held-out records for eval_path "synthetic"
    # The record's field of each canonical name (texts, and the trained signals of
    # dasd_jax/signals.py), e.g. --config.data.fields.prompt=question.
    config.data.fields = ml_collections.ConfigDict(dict(
        prompt="prompt", reference="reference", response="response",
        **{name: name for name in signals.TRAINED}))
    config.data.target = "response"  # which text is trained: response (a rewrite) | reference
    config.data.max_seq_len = 1024  # prompt + target tokens of an example at most
    config.data.buckets = (256, 512, 1024)  # padded lengths; bounded recompiles
    config.data.overlong = "truncate"  # truncate (the response's end) | drop
    config.data.group_by_length = 1  # k > 1: batches of similar lengths within windows of k batches
    config.data.chat_template = True  # use the tokenizer's chat template when it has one
    config.data.system_prompt = ""  # a system message in the chat template ("" = none)
    config.data.prompt_format = "Question: {prompt}\nAnswer: "  # when no chat template is used

    config.rewrite = ml_collections.ConfigDict()  # stage 1 (dasd_jax/rewrite.py)
    # Stage 1 reads (prompt, reference) records from `input` (the forms of data.path) and writes
    # `output`, which stage 2 reads as data.path. "{workdir}" in either path is --config.workdir.
    config.rewrite.input = ""
    config.rewrite.split = "train"  # split of an hf: or save_to_disk input
    # the record's field of the prompt and of the reference
    config.rewrite.fields = ml_collections.ConfigDict(dict(prompt="prompt", reference="reference"))
    # The rewrite file (dasd_jax/rewrite_file.py)
    config.rewrite.output = "{workdir}/rewrites.jsonl"
    config.rewrite.task = "math"  # math | code | commonsense | synthetic: template + answer check
    config.rewrite.template = ""  # "" = the task's answer-aware template; uses {prompt} {reference}
    config.rewrite.mode = "dasd"  # sdft (decode from the reference context) | dasd (co-decoding)
    config.rewrite.alpha = 0.1  # candidates: πref(v) >= alpha * max πref
    config.rewrite.candidate_top_k = 8  # at most this many candidates (0 = no cap)
    # When the reference's top token is at least this likely, it is the only candidate
    # (1.0 = never): candidates adapt to how sharp the reference is.
    config.rewrite.sure_reference = 1.0
    config.rewrite.temperature = 0.0  # 0 = greedy (dasd: the base's most confident candidate)
    config.rewrite.top_k = 0  # sampling only: the k likeliest tokens (0 = all)
    config.rewrite.top_p = 1.0  # sampling only: nucleus mass (1 = all)
    config.rewrite.min_p = 0.0  # sampling only: tokens at least min_p x the top one's probability
    config.rewrite.max_new_tokens = 512  # a rewrite unfinished after this many falls back
    config.rewrite.batch_size = 32  # examples per decode batch
    # Padded prompt lengths; longer prompts are skipped
    config.rewrite.prompt_buckets = (256, 512, 1024, 2048)
    config.rewrite.limit = 0  # rewrite only the first N records (0 = all)
    config.rewrite.generated_examples = 512  # for input "synthetic"

    config.train = ml_collections.ConfigDict()  # stage 2 (dasd_jax/train.py, dasd_jax/step.py)
    config.train.steps = 1000  # optimizer steps of the whole run (a resumed run goes on to it)
    config.train.batch_size = 64  # global, in sequences
    config.train.micro_batches = 1  # gradient accumulation steps per batch
    config.train.log_every = 10  # each logged metric is the mean over these steps (lr: current)
    config.train.eval_every = 0  # 0 = only at the end (when data.eval_path is set)
    config.train.eval_batches = 8  # held-out batches per evaluation of the loss
    config.train.learning_rate = 1e-5  # peak, after warmup
    config.train.warmup_steps = 30  # linear warmup from 0
    config.train.end_lr_ratio = 0.1  # cosine decays to learning_rate * end_lr_ratio
    config.train.weight_decay = 0.0  # AdamW's, on matrices only
    config.train.b1 = 0.9  # AdamW's first-moment decay
    config.train.b2 = 0.95  # AdamW's second-moment decay
    config.train.eps = 1e-8  # AdamW's epsilon
    config.train.grad_clip = 1.0  # global gradient norm clip
    config.train.loss_normalization = "selected"  # selected | response (token counts)
    config.train.loss_chunk = 512  # tokens per chunk of the vocabulary projection
    config.train.base_dtype = "bfloat16"  # dtype of the frozen base copy and its forward
    # model: run the frozen base forward in the step; cached: read base_logprob / base_top1
    # from the records (every rewrite line has them), no base forward at all; auto: cached
    # when the training file was rewritten by this model and carries them, else model.
    config.train.base_confidence = "auto"

    config.lora = ml_collections.ConfigDict()  # low-rank adapters (dasd_jax/lora.py)
    # LoRA: train low-rank adapters on frozen weights instead of every weight. The frozen
    # weights (model.param_dtype) serve as the trainee's base and, adapters off, as DASD's base
    # model: no second copy. Adapters and their optimizer state are float32.
    config.lora.rank = 0  # 0 = off (full fine-tuning)
    config.lora.alpha = 16.0  # the adapters' update is scaled by alpha / rank
    config.lora.dropout = 0.0  # on the adapters' input, in the training forward only
    # Projections adapted
    config.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    config.lora.export_adapters = True  # also write {workdir}/adapters in PEFT's layout

    config.selection = ml_collections.ConfigDict()  # which tokens train (dasd_jax/selection.py)
    config.selection.rule = "dasd"  # all | dasd | ppl_filter | rho1 | dft | random
    config.selection.tau = 0.1  # fixed confidence threshold (when tau_quantile is unset)
    config.selection.tau_quantile = config_dict.placeholder(float)  # per-batch quantile of b
    config.selection.tau_min = 0.01  # the quantile tau is clipped to [tau_min, tau_max]
    config.selection.tau_max = 0.5  # (see tau_min)
    config.selection.kappa = 0.5  # q_t >= kappa: the answer-aware reference was confident
    # When a high-PPL token (b_t < tau) with q_t >= kappa is a correction (kept), not drift:
    # veto = the reference rules out the base's own choice v0 = argmax π0 (r_t = πref(v0) /
    # max πref < rho); base_unsure = the base had no strong competing preference (m_t < gamma);
    # reference_confident = q_t >= kappa alone.
    config.selection.correction_test = "veto"
    config.selection.rho = config_dict.placeholder(float)  # None: the rewrite's alpha
    config.selection.gamma = 0.5  # m_t < gamma, for correction_test=base_unsure
    config.selection.confidence_model = "base"  # base | current (the trainee)
    config.selection.rho1_keep = 0.6  # fraction of response tokens rho1 keeps per batch
    # High-PPL tokens without a recorded q (plain references): drop (= ppl_filter there) | keep
    config.selection.missing_ref = "drop"
    # Fallback lines of a rewrite file (source "reference": the reference model read the very
    # text it scores, so its q there is copying): rule (like any line) | ppl_filter (aligned
    # tokens only) | drop (no token) | all (every token). dasd and random only.
    config.selection.fallback = "rule"
    # The target's end-of-turn / end-of-sequence tokens (and what the template puts after them)
    # are always kept by the selecting rules (dasd, ppl_filter, rho1, random).
    config.selection.keep_structural = True

    config.eval = ml_collections.ConfigDict()  # stage 3 (dasd_jax/evaluate.py)
    config.eval.tasks = "gsm8k"  # comma-separated; see dasd_jax/evaluate.py for the list
    # Modules outside the package whose EVAL_TASKS join the registry (dasd_jax/tasks/registry.py)
    config.eval.task_modules = ""
    # HF dir or hub id, a workdir with checkpoints/, or "base" (model.path / its random init)
    config.eval.checkpoint = "{workdir}/hf"
    config.eval.baseline = "base"  # also evaluated, for the forgetting table ("" = none)
    config.eval.tuned_tasks = "gsm8k"  # tasks the model was fine-tuned for (the rest = forgetting)
    config.eval.predictions = ""  # JSONL of {task, id, completion}: score without a model
    config.eval.paths = ml_collections.ConfigDict(dict(  # where each task's data is
        gsm8k="hf:openai/gsm8k:main", math500="hf:HuggingFaceH4/MATH-500", humaneval="",
        mbpp="", commonsenseqa="", arc_easy="", arc_challenge="", boolq="", openbookqa="",
        piqa="", siqa="", winogrande="", synthetic=""))
    config.eval.split = "test"  # split of hf: / save_to_disk task data
    config.eval.limit = 0  # first N examples per task (0 = all)
    config.eval.batch_size = 32  # prompts (or scored choices) per compiled pass
    config.eval.max_new_tokens = 512  # a completion unfinished after this many counts as unfinished
    config.eval.temperature = 0.0  # 0 = greedy; > 0 with samples > 1 gives pass@k
    config.eval.top_p = 1.0  # sampling only: nucleus mass
    config.eval.samples = 1  # completions per problem (pass@k with temperature > 0)
    # Padded prompt lengths; longer prompts are skipped
    config.eval.prompt_buckets = (256, 512, 1024, 2048)
    # Multiple choice: tokenizer = the special tokens the tokenizer's encode() adds itself, as
    # lm-eval's hf model does by default | always = a BOS first (models that need it) | never
    config.eval.bos = "tokenizer"
    # How far the model has moved from the base (dasd_jax/shift.py): on the prompts of these
    # tasks ("" = off), the base's own greedy answers, teacher-forced: KL(base || tuned), the
    # change in NLL, the share of tokens whose top-1 changed. Answers are cached per base.
    config.eval.shift = ml_collections.ConfigDict(dict(
        tasks="", limit=64, max_new_tokens=128, cache="~/.cache/dasd_jax/shift"))
    config.eval.output = "{workdir}/eval"  # {task}.jsonl per task and summary.json

    config.analyze = ml_collections.ConfigDict()  # what DASD keeps and drops (dasd_jax/analyze.py)
    # Training-data sources to compare, "name=path[@target],...": path in the forms of data.path,
    # target response (default) or reference. The default compares a rewrite file's references
    # with its responses.
    config.analyze.sources = ("references={workdir}/rewrites.jsonl@reference,"
                              "rewrites={workdir}/rewrites.jsonl")
    config.analyze.output = "{workdir}/analysis"  # summary.json, confidence.png, tokens.html
    config.analyze.limit = 0  # records per source (0 = all)
    config.analyze.examples = 20  # records per source shown in tokens.html

    config.checkpoint = ml_collections.ConfigDict()  # Orbax checkpoints and the HF export
    config.checkpoint.every = 100  # steps between checkpoints (and a save on SIGTERM/SIGINT)
    config.checkpoint.max_to_keep = 3  # the newest checkpoints kept
    # 0: resume from the newest checkpoint that restores (damaged ones are set aside); N: from
    # step N (newer checkpoints are set aside as superseded)
    config.checkpoint.resume_step = 0
    config.checkpoint.async_save = True  # save in the background while training goes on
    config.checkpoint.export = True  # write {workdir}/hf, an HF checkpoint, at the end
    config.checkpoint.export_dtype = "bfloat16"  # dtype of the exported HF weights

    config.metrics = ml_collections.ConfigDict()  # what the trainer logs
    config.metrics.tensorboard = True  # also write {workdir}/tensorboard
    config.metrics.progress_bar = True  # a progress bar (else a log line per log_every steps)
    return config


# ----------------------------------------------------------------------------- variants


def tiny(config: ml_collections.ConfigDict) -> None:
    """A tiny random model trained on generated arithmetic records: offline, < 2 min on 2 cores."""
    config.workdir = config.workdir or "/tmp/dasd_jax_tiny"
    config.model.path = ""
    config.model.param_dtype = "float32"
    config.model.compute_dtype = "float32"  # bf16 is slower than fp32 on CPUs
    config.data.system_prompt = ""  # the generated worlds have no system message
    config.data.path = "synthetic"  # generated records: prompt + reference, no rewrite
    config.data.eval_path = "synthetic"
    config.data.target = "reference"
    config.rewrite.input = "synthetic"
    config.rewrite.task = "synthetic"
    config.rewrite.generated_examples = 64
    config.rewrite.max_new_tokens = 96
    config.rewrite.batch_size = 32
    config.rewrite.prompt_buckets = (128, 256, 384)
    config.eval.tasks = "synthetic"
    config.eval.tuned_tasks = "synthetic"
    config.eval.limit = 32
    config.eval.max_new_tokens = 64
    config.eval.batch_size = 16
    config.eval.prompt_buckets = (64, 128, 256)
    config.data.generated_examples = 1024
    config.data.generated_eval_examples = 64
    config.data.max_seq_len = 256
    config.data.buckets = (192, 256)
    config.train.steps = 60
    config.train.batch_size = 16
    config.train.micro_batches = 1
    config.train.log_every = 10
    config.train.eval_batches = 2
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 5
    config.train.loss_chunk = 64
    config.train.base_dtype = "float32"
    # A random base is unsure of every token: a per-batch quantile keeps the DASD rule active.
    config.selection.tau_quantile = 0.3
    config.selection.tau_min = 0.0
    config.checkpoint.every = 20
    config.checkpoint.export_dtype = "float32"


def sft(config: ml_collections.ConfigDict) -> None:
    """Plain SFT on the reference answers: rule `all`, target `reference`."""
    config.selection.rule = "all"
    config.data.target = "reference"


def sdft(config: ml_collections.ConfigDict) -> None:
    """SDFT: rule `all` on the rewrites."""
    config.selection.rule = "all"
    config.data.target = "response"


VARIANTS = {"tiny": tiny, "sft": sft, "sdft": sdft}


def apply_variants(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Applies the comma-separated variants in `arg` (e.g. "tiny,sft") in order."""
    for name in filter(None, (arg or "").split(",")):
        if name.startswith("demo"):
            raise UserError("the embedded demo has its own entry point and config: python -m "
                            "dasd_jax.demo --config=configs/demo.py (variants :small, :gpu)")
        if name not in VARIANTS:
            raise UserError(f"unknown config variant {name!r}; choose from {', '.join(VARIANTS)}")
        VARIANTS[name](config)
    return config
