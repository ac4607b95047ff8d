"""Metrics files, FLOP counts, throughput and console output."""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dasd_jax import metrics
from dasd_jax.model import ModelConfig


def read_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def test_each_write_appends_one_json_line_with_step_first_and_plain_numbers(tmp_path):
    with metrics.MetricsWriter(tmp_path / "run", tensorboard=False) as writer:
        writer.write(10, {"loss": jnp.asarray(1.5), "kept": np.float32(0.25),
                          "tokens": np.int64(4096), "lr": 1e-5, "skipped": None})
        writer.write(20, {"loss": jnp.asarray([0.75], jnp.bfloat16)})

    lines = read_lines(tmp_path / "run")
    assert lines == [{"step": 10, "loss": 1.5, "kept": 0.25, "tokens": 4096, "lr": 1e-5},
                     {"step": 20, "loss": 0.75}]
    assert list(lines[0]) == ["step", "loss", "kept", "tokens", "lr"]
    assert isinstance(lines[0]["tokens"], int)


def test_a_line_is_on_disk_as_soon_as_it_is_written(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, tensorboard=False)
    writer.write(1, {"loss": 2.0})
    assert read_lines(tmp_path) == [{"step": 1, "loss": 2.0}]
    writer.close()


def test_a_metric_that_is_not_a_scalar_is_refused_by_name(tmp_path):
    with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(TypeError, match="'per_token'"):
            writer.write(1, {"per_token": jnp.ones(3)})
        with pytest.raises(TypeError, match="'note'"):
            writer.write(1, {"note": "text"})


def test_resuming_drops_lines_logged_after_the_restored_step(tmp_path):
    with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in (10, 20, 30, 40):
            writer.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as file:
        file.write('{"step": 50, "lo')  # the crashed run died mid-line

    with metrics.MetricsWriter(tmp_path, tensorboard=False, resume_step=20) as writer:
        writer.write(30, {"loss": 3.0})

    assert read_lines(tmp_path) == [{"step": 10, "loss": 10.0}, {"step": 20, "loss": 20.0},
                                    {"step": 30, "loss": 3.0}]
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temporary file left behind


def test_appending_after_a_line_cut_short_starts_a_new_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(3, {"loss": 3.0})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[-1] == '{"step": 3, "loss": 3.0}'


def test_a_disabled_writer_writes_nothing_anywhere(tmp_path):
    workdir = tmp_path / "secondary"
    with metrics.MetricsWriter(workdir, tensorboard=True, enabled=False, resume_step=0) as writer:
        writer.write(1, {"loss": 1.0})
    assert not workdir.exists()


def test_tensorboard_gets_an_event_file(tmp_path):
    with metrics.MetricsWriter(tmp_path, resume_step=5) as writer:
        writer.write(6, {"loss": jnp.asarray(0.5), "mfu": 0.4})
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0


# A model small enough to count by hand: D=16, F=32, H=4, K=2, E=4, L=2, V=100.
TINY = ModelConfig(model_type="llama", vocab_size=100, hidden_size=16, intermediate_size=32,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)


def test_step_flops_match_a_hand_count_for_a_tiny_model():
    attention_weights = 16 * 4 * (2 * 4 + 2 * 2)  # q, o: D*H*E each; k, v: D*K*E each = 768
    mlp_weights = 3 * 16 * 32  # gate, up, down = 1536
    unembedding = 100 * 16  # 1600
    assert attention_weights == 768 and mlp_weights == 1536
    expected = 2 * (attention_weights + mlp_weights) + unembedding
    assert metrics.matmul_params(TINY) == expected == 6208

    batch, seq = 2, 8
    matmuls = 2 * 6208 * batch * seq  # 198,656
    attention = 2 * 2 * 2 * batch * seq**2 * 4 * 4 / 2  # QK^T and AV, causal half: 8,192
    forward = matmuls + attention  # 206,848
    assert metrics.forward_flops(TINY, batch, seq) == forward == 206_848
    assert metrics.step_flops(TINY, batch, seq, base_forward=False) == 3 * forward
    assert metrics.step_flops(TINY, batch, seq, base_forward=True) == 4 * forward
    assert metrics.step_flops(TINY, batch, seq, base_forward=True,
                              extra_trainee_forward=True) == 5 * forward


def test_tying_embeddings_changes_the_param_count_but_not_the_flops():
    untied = TINY.replace(tie_word_embeddings=False)
    assert untied.num_params - TINY.num_params == 100 * 16
    # Untied: the lookup table is a gather, left out; tied: the one matrix is the projection.
    assert metrics.matmul_params(untied) == untied.num_params - 100 * 16 - (2 * 2 * 16 + 16)
    assert metrics.matmul_params(TINY) == TINY.num_params - (2 * 2 * 16 + 16)  # minus norms
    assert metrics.forward_flops(untied, 2, 8) == metrics.forward_flops(TINY, 2, 8)


def test_a_sliding_window_shorter_than_the_sequence_attends_to_fewer_pairs():
    windowed = TINY.replace(sliding_window=4)
    pairs = 4 * 8 - 4 * 4 / 2  # 24 instead of 8 * 8 / 2 = 32
    saved = 4 * 2 * 2 * (32 - pairs) * 4 * 4
    assert metrics.forward_flops(TINY, 2, 8) - metrics.forward_flops(windowed, 2, 8) == saved
    assert metrics.forward_flops(TINY.replace(sliding_window=8), 2, 8) == 206_848


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("TPU v6 lite", 918e12),
    ("cpu", None), ("TPU v4 lite", None), ("NVIDIA L40S", None), ("Unknown Accelerator", None),
])
def test_peak_flops_are_looked_up_by_the_device_kind_jax_reports(kind, peak):
    assert metrics.peak_flops_per_device(kind) == peak


def test_peak_flops_are_unknown_for_float32():
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3", "float32") is None
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3", jnp.float16) == 989e12


class FakeClock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_throughput_reports_rates_since_the_previous_measurement():
    clock = FakeClock(100.0, 110.0, 115.0)
    speed = metrics.Throughput(8e13, 4, 1e14, clock=clock)

    first = speed.measure(steps=10, tokens=40_960)
    assert first == pytest.approx({"tokens_per_s": 4096.0, "tokens_per_s_per_device": 1024.0,
                                   "steps_per_s": 1.0, "tflops_per_s_per_device": 20.0,
                                   "mfu": 0.2})
    second = speed.measure(steps=10, tokens=40_960)  # the same work in half the time
    assert second["steps_per_s"] == 2.0 and second["mfu"] == pytest.approx(0.4)


def test_throughput_without_flops_or_peak_reports_only_what_it_knows():
    assert metrics.Throughput(clock=FakeClock(0.0, 2.0)).measure(4, 100) == {
        "tokens_per_s": 50.0, "tokens_per_s_per_device": 50.0, "steps_per_s": 2.0}
    no_peak = metrics.Throughput(1e12, 1, None, clock=FakeClock(0.0, 1.0)).measure(1, 10)
    assert no_peak["tflops_per_s_per_device"] == 1.0 and "mfu" not in no_peak


def test_throughput_reset_leaves_compilation_out():
    speed = metrics.Throughput(clock=FakeClock(0.0, 30.0, 31.0))
    speed.reset()  # after the first (compiling) step
    assert speed.measure(1, 10)["steps_per_s"] == 1.0


@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (44.6, "45s"), (65, "1m05s"), (3600, "1h00m"), (2 * 3600 + 185, "2h03m"),
    (3 * 86400 + 4 * 3600, "3d04h"), (float("inf"), "?"), (float("nan"), "?"), (-1, "?"),
])
def test_durations_are_short_and_readable(seconds, text):
    assert metrics.format_duration(seconds) == text


def test_a_log_line_shows_step_metrics_and_eta():
    line = metrics.format_log_line(
        20, 100, {"loss": jnp.asarray(1.2341), "kept": np.float32(0.81),
                  "tokens_per_s": 12_345.4, "mfu": None},
        elapsed_s=16.25)
    assert line == "step 20/100 loss 1.234 kept 0.81 tok/s 12,345 eta 1m05s"


def test_a_resumed_log_line_times_only_the_steps_run_since_the_resume():
    line = metrics.format_log_line(60, 100, {"tokens": 4096}, elapsed_s=10.0, start_step=50)
    assert line == "step 60/100 tokens 4,096 eta 40s"
    assert metrics.format_log_line(50, 100, {}, elapsed_s=0.0, start_step=50) == "step 50/100"


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_is_off_when_stderr_is_not_a_terminal(capsys):
    bar = metrics.ProgressBar(100, enabled=True, file=io.StringIO())
    bar.update(10, loss=1.0)
    bar.write("step 10/100 loss 1")
    bar.close()
    assert not bar.active
    assert capsys.readouterr().out == "step 10/100 loss 1\n"


def test_the_progress_bar_on_a_terminal_shows_position_and_metrics():
    terminal = FakeTerminal()
    bar = metrics.ProgressBar(100, initial=40, file=terminal)
    bar.update(50, loss=jnp.asarray(0.5), tokens_per_s=2000.0)
    bar.close()
    assert bar.active
    assert "50/100" in terminal.getvalue() and "loss=0.5, tok/s=2,000" in terminal.getvalue()


def test_a_disabled_progress_bar_stays_off_even_on_a_terminal():
    terminal = FakeTerminal()
    bar = metrics.ProgressBar(100, enabled=False, file=terminal)
    bar.update(5, loss=1.0)
    bar.close()
    assert not bar.active and terminal.getvalue() == ""


def test_throughput_uses_the_flops_it_is_given_for_steps_of_different_lengths():
    times = iter([0.0, 2.0])
    speed = metrics.Throughput(flops_per_step=1e12, num_devices=2, peak_flops=1e12,
                               clock=lambda: next(times))
    rates = speed.measure(steps=4, tokens=100, flops=6e12)  # not 4 * 1e12
    assert rates["tflops_per_s_per_device"] == 1.5 and rates["mfu"] == 1.5


def test_logged_metrics_are_window_means_except_the_current_learning_rate():
    steps = [{"loss": jnp.float32(1.0), "kept_ratio": jnp.float32(0.0),
              "learning_rate": jnp.float32(3.0), "tau": None},
             {"loss": jnp.float32(3.0), "kept_ratio": jnp.float32(1.0),
              "learning_rate": jnp.float32(2.0), "tau": None}]
    total = metrics.add(steps[0], steps[1])
    mean = metrics.window_mean(metrics.fetch_numbers(total), 2, metrics.fetch_numbers(steps[1]))
    assert mean == {"loss": 2.0, "kept_ratio": 0.5, "learning_rate": 2.0}
