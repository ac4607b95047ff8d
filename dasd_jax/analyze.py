"""What DASD keeps and drops: `python -m dasd_jax.analyze --config=configs/math.py[:variant]`.

For each training-data source in `analyze.sources` (e.g. references, SDFT rewrites, DASD
rewrites) it measures every response token under the base model: confidence `b_t = π0(ŷ_t)`, the
base's top-1 probability `m_t`, the answer-aware reference's `q_t = πref(ŷ_t)` and
`r_t = πref(v0) / max πref` for the base's own choice v0 (read from the records when a rewrite
recorded them, else computed by teacher-forced passes in the base and answer-aware contexts),
then reports

* the high-PPL ratio (share of tokens with 1/b_t > θ) for θ ∈ {10, 100},
* aligned / correction / drift / structural counts under `config.selection` (the DASD rule,
  with its configured correction test; `rho` unset = the source's rewrite alpha),
* `confidence.png`: histograms of log10 b_t per source,
* `tokens.html`: a self-contained page showing examples with every response token coloured by
  its category, with b_t, q_t, m_t and r_t on hover,

all in `{workdir}/analysis` (`analyze.output`), with the numbers in `summary.json`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dasd_jax import (atomic, cli, data, loading, rewrite_file, run_config, sampling, selection,
                      sharding, signals, stages)
from dasd_jax.errors import UserError

THRESHOLDS = (10, 100)
CATEGORIES = ("aligned", "correction", "drift", "structural")
CATEGORY_COLORS = {"aligned": "#d8f0d8", "correction": "#ffe08a", "drift": "#f6b4b4",
                   "structural": "#cfe0ff", "prompt": "#ffffff"}


def parse_sources(spec: str) -> list[tuple[str, str, str]]:
    """"name=path[@target],..." -> [(name, path, target)]; target: response (default) or
    reference."""
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
    """Per record with a non-empty target: {"record", "response_ids" (the target's tokens),
    "fallback", "structural" (bool per token: at or after the first stop token), and a float32
    array of each trained signal over the ids}: recorded values where a rewrite has them, else
    teacher-forced (`rewrite_file.fill_signals`)."""
    data_config = run_config.replaced(config.data, target=target)
    prompt_template = rewrite_file.template(config)
    stops = set(sampling.stop_ids(cfg, tokenizer))
    items, prompts = [], []
    for record in records:
        text = record.get(target) or ""
        if not text.strip():
            continue
        use_recorded = target == "response" and "response_ids" in record
        ids = (record["response_ids"] if use_recorded else
               data.response_tokens(record["prompt"], text, tokenizer, data_config))
        item = {"record": record, "response_ids": ids,
                "fallback": target == "response" and record.get("source") == "reference"}
        item.update({name: record.get(name) if use_recorded else None
                     for name in signals.TRAINED})
        first_stop = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        item["structural"] = np.arange(len(ids)) >= first_stop
        prompt = {"base_prompt": data.prompt_tokens(record["prompt"], tokenizer, data_config)}
        if record.get("reference"):
            prompt["reference_prompt"] = data.prompt_tokens(prompt_template.format(
                prompt=record["prompt"], reference=record["reference"]), tokenizer, data_config)
        items.append(item)
        prompts.append(prompt)
    rewrite_file.fill_signals(config, cfg, params, items, prompts)
    for item in items:
        for name in signals.TRAINED:
            values = item[name]
            item[name] = (signals.empty(name, len(item["response_ids"])) if values is None
                          else np.asarray(values, signals.BY_NAME[name].dtype))
    return items


def categorize(items: list[dict], selection_config) -> dict[str, Any]:
    """Adds per-token categories to `items` and returns the source's statistics."""
    lengths = [len(item["response_ids"]) for item in items]
    width = max(lengths)

    def pad(name, fill):
        return np.stack([np.pad(np.asarray(item[name]), (0, width - len(item["response_ids"])),
                                constant_values=fill) for item in items])

    mask = np.arange(width)[None] < np.asarray(lengths)[:, None]
    found = selection.Signals(
        loss_mask=mask, structural=pad("structural", False),
        fallback=mask & np.asarray([item["fallback"] for item in items])[:, None],
        **{name: pad(name, 0.0 if name in signals.BASE else signals.BY_NAME[name].fill)
           for name in signals.TRAINED})
    groups = jax.device_get(selection.categories(found, selection_config))
    for row, item in enumerate(items):
        item["category"] = np.select(
            [groups[name][row] for name in ("aligned", "correction", "structural")],
            ["aligned", "correction", "structural"], "drift")[:lengths[row]]
    base = np.asarray(found.base_logprob)[mask]
    stats = {"records": len(items), "tokens": int(mask.sum()), "tau": float(groups["tau"]),
             "correction_test": selection_config.correction_test}
    stats.update({f"high_ppl_{t}": float(np.mean(base < -np.log(t))) for t in THRESHOLDS})
    stats.update({name: int(groups[name].sum()) for name in CATEGORIES})
    return stats


def plot_confidence(sources: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-6, 0, 61)
    for name, items in sources.items():
        values = np.concatenate([item["base_logprob"] for item in items]) / np.log(10)
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
        + " ".join(f"<span class='{c}'>&nbsp;{c}&nbsp;</span>" for c in CATEGORIES)
        + ". Hover a token for its base confidence b, the reference's probability q of it, the "
        "base's top-1 probability m and r = πref(base's choice) / max πref. Aligned, correction "
        "and structural (end-of-turn) tokens are trained on; drift tokens are dropped.</p>",
    ]
    for name, items in sources.items():
        numbers = stats[name]
        parts.append(f"<h2>{html.escape(name)}</h2><p>{numbers['records']} records, "
                     f"{numbers['tokens']} tokens; high-PPL (1/b &gt; 10) "
                     f"{numbers['high_ppl_10']:.1%}; "
                     + ", ".join(f"{c} {numbers[c]}" for c in CATEGORIES)
                     + f"; τ = {numbers['tau']:.3g}; correction test "
                     f"{html.escape(numbers['correction_test'])}</p>")
        for item in items[:examples]:
            spans = []
            ratios = np.exp(item["ref_logprob_base_choice"] - item["ref_top1"])
            for token, category, b, q, m, r in zip(
                    item["response_ids"], item["category"], np.exp(item["base_logprob"]),
                    np.exp(item["ref_logprob"]), item["base_top1"], ratios):
                text = html.escape(tokenizer.decode([int(token)]))
                shown = lambda v: "n/a" if np.isnan(v) else f"{v:.3f}"
                spans.append(f"<span class='{category}' title='{category}: b={b:.3f} "
                             f"q={shown(q)} m={m:.3f} r={shown(r)}'>{text}</span>")
            parts.append(f"<h3>{html.escape(str(item['record'].get('id', '')))}</h3>"
                         f"<p><b>Prompt.</b> {html.escape(item['record']['prompt'])}</p>"
                         f"<div class='tokens'>{''.join(spans)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


@stages.stage("analyze")
def analyze(config: Any) -> dict:
    """Writes summary.json, confidence.png and tokens.html; returns the summary."""
    mesh = sharding.make_mesh(config.mesh.shape)
    cfg, params, tokenizer = loading.load_model(config, mesh)
    output = Path(config.analyze.output)
    sources, stats = {}, {}
    with sharding.activation_rules(mesh, config.mesh.rules):
        for name, path, target in parse_sources(config.analyze.sources):
            records = data.load_records(path, config.data.split,
                                        config.data.fields, target=target,
                                        generated_examples=config.data.generated_examples,
                                        seed=config.seed)
            if config.analyze.limit:
                records = records[:config.analyze.limit]
            items = token_signals(config, cfg, params, tokenizer, records, target)
            if not items:
                raise UserError(f"source {name!r} ({path}) has no non-empty {target}s")
            rho = config.selection.rho  # unless the config set it: each source's own alpha
            if config.selection.rho_from != "config":
                rho = rewrite_file.recorded_alpha(path) or config.rewrite.alpha
            stats[name] = categorize(items, run_config.replaced(config.selection, rho=rho))
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
             f"{'aligned':>9}{'correct.':>9}{'drift':>9}{'struct.':>9}"
    rows = [header, "-" * len(header)]
    for name, s in stats.items():
        total = max(s["tokens"], 1)
        rows.append(f"{name:<16}{s['records']:>8}{s['tokens']:>9}{s['high_ppl_10']:>9.1%}"
                    f"{s['high_ppl_100']:>9.1%}" + "".join(f"{s[c] / total:>9.1%}"
                                                          for c in CATEGORIES))
    return "\n".join(rows)


if __name__ == "__main__":
    cli.run(analyze)
