"""The eval report: PNG plots, report.md, and a self-contained report.html (plots embedded as base64)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.config import Recipe  # noqa: E402
from pipeline.metrics import SUPPORTED_LANGUAGES, words  # noqa: E402

# (key in metrics.json, label, the better direction) in table and plot order.
HEADLINE = [
    ("bits_per_byte", "bits per reply byte (teacher-forced)", "lower"),
    ("assistant_nll", "assistant-token NLL", "lower"),
    ("perplexity", "assistant-token perplexity", "lower"),
    ("stop_rate", "stop rate", "higher"),
    ("mean_new_tokens", "mean reply tokens", None),
    ("mean_words", "mean reply words", None),
    ("distinct_2", "distinct-2", "higher"),
    ("loop_rate_4gram", "replies with a 4-gram loop", "lower"),
    ("rouge_l", "ROUGE-L vs reference", "higher"),
    ("language_match", "reply in prompt's language", "higher"),
]
SHARES = {"stop_rate", "distinct_2", "loop_rate_4gram", "rouge_l", "language_match"}
PLOTTED = ["bits_per_byte", "assistant_nll", "stop_rate", "distinct_2", "loop_rate_4gram", "rouge_l",
           "language_match", "mean_words"]


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_interval(m: dict, key: str) -> str:
    interval = m.get(f"{key}_ci95")
    text = fmt(m.get(key))
    return f"{text} [{fmt(interval[0])}, {fmt(interval[1])}]" if interval and m.get(key) is not None else text


# --------------------------------------------------------------------------- plots


def loss_history(trainer_state: Path) -> list[tuple[int, float]]:
    if not trainer_state.exists():
        return []
    history = json.loads(trainer_state.read_text()).get("log_history", [])
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]


def plot_loss(points: list[tuple[int, float]], path: Path) -> Path | None:
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
    ax.set(xlabel="optimizer step", ylabel="training loss (assistant tokens)", title="Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bars(results: dict, path: Path) -> Path:
    names = list(results)
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    labels = {key: (label, better) for key, label, better in HEADLINE}
    for ax, key in zip(axes.flat, PLOTTED):
        values = [results[n].get(key) for n in names]
        heights = [v if v is not None else 0 for v in values]
        bars = ax.bar(names, heights, color=[f"C{i}" for i in range(len(names))])
        intervals = [results[n].get(f"{key}_ci95") for n in names]
        if any(intervals):
            low = [h - (ci[0] if ci else h) for h, ci in zip(heights, intervals)]
            high = [(ci[1] if ci else h) - h for h, ci in zip(heights, intervals)]
            ax.errorbar(names, heights, yerr=[low, high], fmt="none", ecolor="black", capsize=4)
        for bar, value in zip(bars, values):
            ax.annotate(fmt(value, 2), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=8)
        label, better = labels[key]
        ax.set_title(label + (f" ({better} is better)" if better else ""), fontsize=9)
        if key in SHARES:
            ax.set_ylim(0, 1.1)
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle("Per-model metrics (error bars: bootstrap 95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lengths(replies: dict[str, list[dict]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    lengths = {name: [len(words(r["text"])) for r in rs] for name, rs in replies.items()}
    top = max((max(v, default=0) for v in lengths.values()), default=0)
    bins = list(range(0, top + 10, max(1, (top + 10) // 25)))
    for i, (name, values) in enumerate(lengths.items()):
        ax.hist(values, bins=bins, histtype="step", linewidth=2, label=name, color=f"C{i}")
    ax.set(xlabel="reply length (words)", ylabel="replies", title="Reply lengths")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_preference(judged: dict, path: Path) -> Path | None:
    vs = {other: r for other, r in judged.get("vs", {}).items() if r["win_rate"] is not None}
    if not vs:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.8 + 0.6 * len(vs)))
    names, rates = list(vs), [r["win_rate"] for r in vs.values()]
    intervals = [r["win_rate_ci95"] or (rate, rate) for r, rate in zip(vs.values(), rates)]
    ax.barh(names, rates, xerr=[[r - ci[0] for r, ci in zip(rates, intervals)],
                                [ci[1] - r for r, ci in zip(rates, intervals)]], capsize=4)
    ax.axvline(0.5, color="grey", linestyle="--")
    ax.set(xlim=(0, 1), xlabel=f"{judged['anchor']} win rate (ties count half)", title="LLM-judge preference")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- tables and text


def metrics_table(results: dict) -> tuple[list[str], list[list[str]]]:
    names = list(results)
    rows = [[label, *(with_interval(results[n], key) for n in names)] for key, label, _ in HEADLINE]
    rows.append(["teacher-forced tokens / examples", *(f"{results[n].get('tokens')} / {results[n].get('examples')}"
                                                       for n in names)])
    rows.append(["prompts generated (ROUGE-L on / language decided on)",
                 *(f"{results[n]['prompts']} ({results[n]['rouge_l_prompts']} / {results[n]['language_match_prompts']})"
                   for n in names)])
    rows.append(["generated tokens per second", *(fmt(results[n]["generated_tokens_per_second"], 1) for n in names)])
    return ["metric", *names], rows


def split_table(results: dict, split: str) -> tuple[list[str], list[list[str]]]:
    """Bits per byte by turn or language; the token-level NLL is in metrics.json."""
    names = list(results)
    keys = sorted({k for n in names for k in results[n].get(split, {})}, key=lambda k: (len(k), k))
    cell = lambda m: with_interval(m, "bits_per_byte") + f" (n={m.get('examples', 0)})"  # noqa: E731
    rows = [[key, *(cell(results[n][split].get(key, {})) for n in names)] for key in keys]
    return [split.removeprefix("by_"), *names], rows


def preference_lines(judged: dict) -> list[str]:
    if not judged["configured"]:
        return ["No judge configured (`eval.judge.base_url` is empty), so there is no pairwise preference. "
                "Nothing here is estimated in its place."]
    lines = [f"Judge `{judged['model']}`; every prompt asked in both answer orders; win rate of "
             f"**{judged['anchor']}** with ties counted half; interval: bootstrap 95% over prompts "
             f"(Wilson 95% over verdicts in metrics.json).", ""]
    lines += ["| vs | win rate [95%] | wins / ties / losses | invalid answers | request errors | order-consistent |",
              "| --- | --- | --- | --- | --- | --- |"]
    for other, r in judged["vs"].items():
        lines.append(f"| {other} | {with_interval(r, 'win_rate')} | {r['win']} / {r['tie']} / {r['loss']} | "
                     f"{r['invalid']} | {r['error']} | {fmt(r['order_consistency'], 2)} |")
    return lines


NOTES = [
    "Teacher-forced numbers score the validation conversations' reference assistant turns (including the "
    "end-of-turn token), each model under the template it is served with. Token NLL and perplexity depend on "
    "the tokenizer: compare them only between models that share one (base and tuned do); bits per reply byte "
    "(total NLL / UTF-8 bytes of the reference replies) compares across tokenizers.",
    "Intervals are percentile bootstraps that resample examples (or prompts), seeded with `eval.seed`.",
    "Stop rate: replies that ended with an end-of-turn/EOS token within `eval.max_new_tokens`.",
    "Distinct-2: unique word bigrams / all word bigrams over all replies. 4-gram loop: a word 4-gram occurring 3+ "
    "times in one reply.",
    "ROUGE-L: LCS F-measure against the reference reply (validation prompts only), via `evaluate` with the "
    "metric script in `pipeline/hf_metrics/rouge_l` (offline).",
    "Language match: a script/stop-word heuristic (" + ", ".join(SUPPORTED_LANGUAGES) + "); pairs where it cannot "
    "decide are left out, and related languages can be confused on short texts.",
]


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    escape = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(map(escape, headers)) + " |", "|" + " --- |" * len(headers),
            *("| " + " | ".join(map(escape, r)) + " |" for r in rows)]


def html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def prompt_text(item: dict) -> str:
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in item["messages"]) if len(item["messages"]) > 1 \
        else item["messages"][0]["content"]


def reply_cell(reply: dict) -> str:
    return reply["text"] + ("" if reply["stopped"] else " [... no end-of-turn within the budget]")


# --------------------------------------------------------------------------- writers


def write_report(out: Path, recipe: Recipe, results: dict, items: list[dict], replies: dict[str, list[dict]],
                 trainer_state: Path) -> dict[str, Path]:
    anchor = next(n for n in results if "judge" in results[n])
    judged = results[anchor]["judge"]
    plots = {"loss": plot_loss(loss_history(trainer_state), out / "loss_curve.png"),
             "metrics": plot_bars(results, out / "metric_bars.png"),
             "lengths": plot_lengths(replies, out / "reply_lengths.png"),
             "preference": plot_preference(judged, out / "preference.png")}
    plots = {k: v for k, v in plots.items() if v is not None}
    headers, rows = metrics_table(results)
    turn_headers, turn_rows = split_table(results, "by_turn")
    lang_headers, lang_rows = split_table(results, "by_language")
    shown = range(min(recipe.eval.report_samples, len(items)))  # showcase prompts come first
    names = list(results)
    intro = (f"Recipe `{recipe.name}`; models {', '.join(f'`{n}`' for n in names)}; "
             f"{results[names[0]].get('examples', 0)} validation conversations scored teacher-forced; "
             f"{len(items)} prompts generated "
             f"({f'sampled, T={recipe.eval.temperature}' if recipe.eval.do_sample else 'greedy'}, "
             f"up to {recipe.eval.max_new_tokens} new tokens).")

    md = [f"# What fine-tuning bought: {recipe.name}", "", intro, "", "## Metrics", "", *md_table(headers, rows), "",
          "## Pairwise preference (LLM judge)", "", *preference_lines(judged), "",
          "## Bits per reply byte by assistant turn", "", *md_table(turn_headers, turn_rows), "",
          "## Bits per reply byte by language", "", *md_table(lang_headers, lang_rows), "", "## Plots", ""]
    md += [f"![{k}]({p.name})" for k, p in plots.items()]
    md += ["", "## How to read this", "", *(f"- {n}" for n in NOTES), "", "## Side-by-side generations", ""]
    for i in shown:
        item = items[i]
        md += [f"### {i + 1}. ({item['source']})", "", "> " + prompt_text(item).replace("\n", "\n> "), ""]
        if item["reference"]:
            md += ["**reference**:", "", "> " + item["reference"].replace("\n", "\n> "), ""]
        for name in names:
            md += [f"**{name}**:", "", "> " + reply_cell(replies[name][i]).replace("\n", "\n> "), ""]
    (out / "report.md").write_text("\n".join(md))

    images = "".join(f'<figure><img alt="{k}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                     f"</figure>" for k, p in plots.items())
    samples = []
    for i in shown:
        item = items[i]
        columns = ([("reference", item["reference"])] if item["reference"] else []) + \
            [(n, reply_cell(replies[n][i])) for n in names]
        cells = "".join(f'<div class="reply"><h4>{html.escape(n)}</h4><p>{html.escape(t)}</p></div>'
                        for n, t in columns)
        samples.append(f'<section class="sample"><h3>{i + 1}. <small>{html.escape(item["source"])}</small></h3>'
                       f'<pre class="prompt">{html.escape(prompt_text(item))}</pre>'
                       f'<div class="grid" style="grid-template-columns: repeat({len(columns)}, 1fr)">{cells}</div>'
                       "</section>")
    preference_html = "".join(f"<p>{html.escape(line)}</p>" for line in preference_lines(judged)[:1])
    if judged["configured"] and judged["vs"]:
        preference_html += html_table(["vs", "win rate [95%]", "wins / ties / losses", "invalid", "errors",
                                       "order-consistent"],
                                      [[o, with_interval(r, "win_rate"), f"{r['win']} / {r['tie']} / {r['loss']}",
                                        r["invalid"], r["error"], fmt(r["order_consistency"], 2)]
                                       for o, r in judged["vs"].items()])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation: {html.escape(recipe.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; }} figure {{ margin: 1em 0; }}
.grid {{ display: grid; gap: 8px; }} .reply {{ border: 1px solid #ddd; padding: 6px; white-space: pre-wrap; }}
.reply h4 {{ margin: 0 0 4px; }} pre.prompt {{ background: #f6f6f6; padding: 6px; white-space: pre-wrap; }}
</style></head><body>
<h1>What fine-tuning bought: {html.escape(recipe.name)}</h1>
<p>{html.escape(intro)}</p>
<h2>Metrics</h2>{html_table(headers, rows)}
<h2>Pairwise preference (LLM judge)</h2>{preference_html}
<h2>Bits per reply byte by assistant turn</h2>{html_table(turn_headers, turn_rows)}
<h2>Bits per reply byte by language</h2>{html_table(lang_headers, lang_rows)}
<h2>Plots</h2>{images}
<h2>How to read this</h2><ul>{"".join(f"<li>{html.escape(n)}</li>" for n in NOTES)}</ul>
<h2>Side-by-side generations</h2>{"".join(samples)}
</body></html>
"""
    (out / "report.html").write_text(page)
    return {"md": out / "report.md", "html": out / "report.html", **plots}
