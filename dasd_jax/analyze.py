"""What DASD keeps and drops: `python -m dasd_jax.analyze --config=configs/math.py[:variant]`.

For each training-data source in `analyze.sources` (e.g. references, SDFT rewrites, DASD
rewrites) it measures every response token under the base model: confidence `b_t = π0(ŷ_t)`, the
base's top-1 probability `m_t`, and the answer-aware reference's `q_t = πref(ŷ_t)` (read from the
records when a rewrite recorded them, else computed by a teacher-forced pass on the base model and
on the answer-aware prompt), then reports

* the high-PPL ratio (share of tokens with 1/b_t > θ) for θ ∈ {10, 100},
* aligned / correction / drift counts under `config.selection` (the DASD rule),
* `confidence.png`: histograms of log10 b_t per source,
* `tokens.html`: a self-contained page showing examples with every response token coloured by
  its category, with b_t, q_t and m_t on hover,

all in `{workdir}/analysis` (`analyze.output`), with the numbers in `summary.json`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dasd_jax import atomic, data, sampling, selection, sharding, stages
from dasd_jax.errors import UserError
from dasd_jax.rewrite import template

THRESHOLDS = (10, 100)
CATEGORY_COLORS = {"aligned": "#d8f0d8", "correction": "#ffe08a", "drift": "#f6b4b4",
                   "prompt": "#ffffff"}


def parse_sources(spec: str) -> list[tuple[str, str, str]]:
    """"name=path[@target],..." -> [(name, path, target)]; target: response (default) | reference."""
    sources = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, rest = part.partition("=")
        path, _, target = rest.partition("@")
        if not name or not path:
            raise UserError(f"--config.analyze.sources: {part!r} is not name=path[@target]")
        target = target or "response"
        if target not in data.TARGETS:
            raise UserError(f"--config.analyze.sources: target {target!r} of {name!r} is not "
                            f"one of {', '.join(data.TARGETS)}")
        sources.append((name, path, target))
    if not sources:
        raise UserError("--config.analyze.sources is required, e.g. "
                        "references={workdir}/rewrites.jsonl@reference,dasd={workdir}/rewrites.jsonl")
    return sources


def token_signals(config, cfg, params, tokenizer, records: list[dict], target: str) -> list[dict]:
    """Per record: the response token ids and float32 arrays b, m, log q over them."""
    data_config = config.data.copy_and_resolve_references()
    data_config.target = target
    prompt_template = template(config)
    out, to_score = [], []
    for record in records:
        text = record.get(target) or ""
        if not text.strip():
            continue
        use_recorded = target == "response" and "response_ids" in record
        ids = (record["response_ids"] if use_recorded else
               data.response_tokens(record["prompt"], text, tokenizer, data_config))
        item = {"record": record, "ids": ids}
        for name in ("ref_logprobs", "base_logprobs", "base_top1"):
            values = record.get(name) if use_recorded else None
            item[name] = None if values is None else np.asarray(values, np.float32)
        if item["base_logprobs"] is None or item["base_top1"] is None:
            to_score.append((item, "base", data.prompt_tokens(record["prompt"], tokenizer, data_config)))
        if item["ref_logprobs"] is None and record.get("reference"):
            answer_aware = prompt_template.format(prompt=record["prompt"], reference=record["reference"])
            to_score.append((item, "ref", data.prompt_tokens(answer_aware, tokenizer, data_config)))
        out.append(item)
    buckets = tuple(sorted({b + config.data.max_seq_len for b in config.rewrite.prompt_buckets}))
    for start in range(0, len(to_score), config.rewrite.batch_size):
        chunk = to_score[start:start + config.rewrite.batch_size]
        scored = sampling.score(cfg, params, [c for _, _, c in chunk],
                                [item["ids"] for item, _, _ in chunk], buckets)
        for (item, which, _), (logprob, top1) in zip(chunk, scored):
            if which == "base":
                item["base_logprobs"], item["base_top1"] = logprob, top1
            else:
                item["ref_logprobs"] = logprob
    for item in out:
        if item["ref_logprobs"] is None:
            item["ref_logprobs"] = np.full(len(item["ids"]), np.nan, np.float32)
    return out


def categorize(items: list[dict], selection_config) -> dict[str, Any]:
    """Adds per-token categories to `items` and returns the source's statistics."""
    lengths = [len(item["ids"]) for item in items]
    width = max(lengths)
    pad = lambda name, fill: np.stack([np.pad(item[name], (0, width - len(item[name])),  # noqa: E731
                                              constant_values=fill) for item in items])
    mask = np.arange(width)[None] < np.asarray(lengths)[:, None]
    signals = selection.Signals(loss_mask=mask, base_logprob=pad("base_logprobs", 0.0),
                                base_top1=pad("base_top1", 0.0), ref_logprob=pad("ref_logprobs", np.nan))
    groups = jax.device_get(selection.categories(signals, selection_config))
    for row, item in enumerate(items):
        item["category"] = np.where(groups["aligned"][row], "aligned",
                                    np.where(groups["correction"][row], "correction", "drift"))[:lengths[row]]
    base = np.asarray(signals.base_logprob)[mask]
    stats = {"records": len(items), "tokens": int(mask.sum()), "tau": float(groups["tau"])}
    stats.update({f"high_ppl_{t}": float(np.mean(base < -np.log(t))) for t in THRESHOLDS})
    stats.update({name: int(groups[name].sum()) for name in ("aligned", "correction", "drift")})
    return stats


def plot_confidence(sources: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-6, 0, 61)
    for name, items in sources.items():
        values = np.concatenate([item["base_logprobs"] for item in items]) / np.log(10)
        axis.hist(np.clip(values, -6, 0), bins=bins, alpha=0.5, label=name, density=True)
    for threshold in THRESHOLDS:
        axis.axvline(-np.log10(threshold), color="black", linestyle=":", linewidth=1)
    axis.set_xlabel("log10 base confidence b_t of each response token")
    axis.set_ylabel("density")
    axis.set_title("Base-model confidence per source (dotted: high-PPL thresholds 10, 100)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def render_html(sources: dict[str, list[dict]], stats: dict, tokenizer, examples: int) -> str:
    """A self-contained page: per source, `examples` records with coloured response tokens."""
    style = "".join(f".{name}{{background:{color}}}" for name, color in CATEGORY_COLORS.items())
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>DASD token categories</title>",
        f"<style>body{{font-family:sans-serif;max-width:60em;margin:auto}}"
        f".tokens{{font-family:monospace;white-space:pre-wrap;line-height:1.6}}"
        f"span[title]{{border-radius:2px}}{style}</style></head><body>",
        "<h1>What DASD keeps and drops</h1><p>Response tokens coloured by category: "
        + " ".join(f"<span class='{c}'>&nbsp;{c}&nbsp;</span>" for c in ("aligned", "correction", "drift"))
        + ". Hover a token for its base confidence b, reference probability q and base top-1 m."
        " Aligned and correction tokens are trained on; drift tokens are dropped.</p>",
    ]
    for name, items in sources.items():
        numbers = stats[name]
        parts.append(f"<h2>{html.escape(name)}</h2><p>{numbers['records']} records, "
                     f"{numbers['tokens']} tokens; high-PPL (1/b &gt; 10) "
                     f"{numbers['high_ppl_10']:.1%}; aligned {numbers['aligned']}, correction "
                     f"{numbers['correction']}, drift {numbers['drift']}; τ = {numbers['tau']:.3g}</p>")
        for item in items[:examples]:
            spans = []
            for token, category, b, q, m in zip(item["ids"], item["category"],
                                                np.exp(item["base_logprobs"]),
                                                np.exp(item["ref_logprobs"]), item["base_top1"]):
                text = html.escape(tokenizer.decode([int(token)]))
                q_text = "n/a" if np.isnan(q) else f"{q:.3f}"
                spans.append(f"<span class='{category}' title='{category}: b={b:.3f} q={q_text} "
                             f"m={m:.3f}'>{text}</span>")
            parts.append(f"<h3>{html.escape(str(item['record'].get('id', '')))}</h3>"
                         f"<p><b>Prompt.</b> {html.escape(item['record']['prompt'])}</p>"
                         f"<div class='tokens'>{''.join(spans)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def analyze(config: Any) -> dict:
    """Writes summary.json, confidence.png and tokens.html; returns the summary."""
    if not config.workdir:
        raise UserError("--config.workdir is required (paths may use {workdir})")
    selection.validate(config.selection)
    mesh = sharding.make_mesh(config.mesh.shape)
    cfg, params, tokenizer = stages.load_model(config, mesh)
    output = Path(stages.workdir_path(config, config.analyze.output)).expanduser()
    sources, stats = {}, {}
    with sharding.activation_rules(mesh, config.mesh.rules):
        for name, path, target in parse_sources(config.analyze.sources):
            records = data.load_records(stages.workdir_path(config, path), config.data.split,
                                        config.data.fields, target=target,
                                        generated_examples=config.data.generated_examples,
                                        seed=config.seed)
            if config.analyze.limit:
                records = records[:config.analyze.limit]
            items = token_signals(config, cfg, params, tokenizer, records, target)
            if not items:
                raise UserError(f"source {name!r} ({path}) has no non-empty {target}s")
            stats[name] = categorize(items, config.selection)
            sources[name] = items
    if jax.process_index() == 0:
        atomic.write_text(output / "summary.json", json.dumps(stats, indent=2) + "\n")
        plot_confidence(sources, output / "confidence.png")
        atomic.write_text(output / "tokens.html",
                          render_html(sources, stats, tokenizer, config.analyze.examples))
        print(format_table(stats))
        print(f"wrote {output / 'summary.json'}, {output / 'confidence.png'}, "
              f"{output / 'tokens.html'}")
    return stats


def format_table(stats: dict) -> str:
    header = f"{'source':<16}{'records':>8}{'tokens':>9}{'PPL>10':>9}{'PPL>100':>9}" \
             f"{'aligned':>9}{'correct.':>9}{'drift':>9}"
    rows = [header, "-" * len(header)]
    for name, s in stats.items():
        total = max(s["tokens"], 1)
        rows.append(f"{name:<16}{s['records']:>8}{s['tokens']:>9}{s['high_ppl_10']:>9.1%}"
                    f"{s['high_ppl_100']:>9.1%}{s['aligned'] / total:>9.1%}"
                    f"{s['correction'] / total:>9.1%}{s['drift'] / total:>9.1%}")
    return "\n".join(rows)


if __name__ == "__main__":
    stages.run(analyze)
