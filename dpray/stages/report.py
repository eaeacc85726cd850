"""``dpray report``: self-contained HTML pages a person can open offline.

Two pages, one per zone:

* ``RUN_DIR/report/index.html`` -- the **public report**: only what the privacy guarantee covers
  or what is public anyway (the ledger, DP outputs, counts, timings, the leak scan) plus win rates
  on evaluation data declared public (``evaluate.data_public``).  Safe to hand to anyone who may
  see the synthetic data.
* ``RUN_DIR/private/report/index.html`` -- the **private report**: everything above plus the
  non-DP statistics of real records that live under ``private/`` (distribution match against the
  held-out split, win rates on it, the membership/canary audit, step times).  For the data owner.

Every plot is inlined as a PNG data URI, so a page can be mailed or attached to a ticket.
Sections for stages that have not run say so instead of failing.  No private *text* is read by
either page; the private one reads private aggregates only.

Each page leads with an "at a glance" summary -- ε spent of the target, the generator, how many
synthetic instructions, distribution match, win rates, the leak scan -- and puts the details
below it, long key/value dumps folded into ``<details>`` blocks.  The example instructions are a
seeded random sample of the filtered set (the same on every render of a run), not its first rows.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import random
from pathlib import Path

from dpray.config import DprayConfig
from dpray.privacy.ledger import Ledger
from dpray.rundir import RunDir, read_json
from dpray.stages.base import Stage, StageResult, register

SAMPLE_ROWS = 25
SAMPLE_SEED = 0  # fixed: the examples shown are the same on every render of a run
EPS_TOLERANCE = 1e-9


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{uri}" style="max-width:100%">'


def _file_img(path: Path, alt: str) -> str:
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return _img(uri, alt)


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)} has not run in this run directory.</p>'


def _details(summary: str, body: str) -> str:
    """A folded block: long key/value dumps stay out of the way until asked for."""
    return f"<details><summary>{html.escape(summary)}</summary>{body}</details>"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _load(path: Path):
    """A public JSON file, or None when it is absent or unreadable."""
    if not path.exists():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _number(value) -> float | None:
    """``value`` as a finite float, or None (absent, None, NaN, a string, a dict...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _eps(value: float) -> str:
    if not math.isfinite(value):
        return "∞"
    return f"{value:.2f}" if value == 0 or abs(value) >= 0.1 else f"{value:.2g}"


def _rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ zones

PRIVATE_REPORT = "private/report/index.html"


def nondp_file(run_dir: RunDir, stage: str, name: str, full: bool) -> Path | None:
    """A non-DP statistic of real records, if this page may show it: ``private/<stage>/<name>``
    in the private report (``full``), never in the public one."""
    return run_dir.private_root / stage / name if full else None


def win_rates_file(run_dir: RunDir, full: bool) -> Path | None:
    """Win rates: public when computed on data declared public, else private-report only."""
    public = run_dir.root / "evaluate" / "win_rates.json"
    data = _load(public)
    if isinstance(data, dict) and data.get("public_data") is True:
        return public
    return run_dir.private_root / "evaluate" / "win_rates.json" if full else None


def _in_private_report(what: str) -> str:
    return (
        f"{what} on held-out real records without DP: in the private report "
        f"(<code>{PRIVATE_REPORT}</code>) only."
    )


# ------------------------------------------------------------------------------ summary


def _card(
    title: str,
    headline: str | None,
    lines: list[str],
    badge: tuple[str, str] | None = None,
    note: str | None = None,
) -> str:
    """One summary card; ``headline``, ``lines`` and ``note`` are HTML (callers escape)."""
    mark = f' <span class="badge {badge[0]}">{html.escape(badge[1])}</span>' if badge else ""
    top = f'<p class="headline">{headline}{mark}</p>' if headline else ""
    items = "".join(f"<li>{line}</li>" for line in lines)
    tail = f'<p class="note">{note}</p>' if note else ""
    return f'<div class="card"><h3>{html.escape(title)}</h3>{top}<ul>{items}</ul>{tail}</div>'


def _nowrap(text: str) -> str:
    return f'<span class="nw">{html.escape(text)}</span>'


def _why_not(value) -> str | None:
    """Why a metric block holds no numbers (``"not measured (...)"``), or None when it does."""
    if isinstance(value, dict):
        for key in ("error", "skipped"):
            if key in value:
                return f"not measured ({value[key]})"
        return None
    return "not measured"


def summary_privacy(run_dir: RunDir, full: bool = False) -> str:
    if not run_dir.ledger_path.exists():
        return _card("Privacy", "not measured", ["Ingestion has not run: there is no ledger."])
    ledger = Ledger.load(run_dir.ledger_path)
    acc = ledger.accounting()
    target = ledger.target_epsilon
    if not math.isfinite(acc.epsilon):
        badge = ("bad", "not DP: a step without noise")
    elif acc.epsilon > target + EPS_TOLERANCE:
        badge = ("bad", "over target")
    else:
        badge = ("ok", "within target")
    headline = f"ε {_eps(acc.epsilon)} <small>spent of {_eps(target)}</small>"
    lines = [
        f"δ {ledger.target_delta:.3g} · unit <b>{html.escape(ledger.unit)}</b> · accountant "
        f"{html.escape(acc.accountant)}"
    ]
    stages = ledger.per_stage()
    if stages:
        parts = " · ".join(_nowrap(f"{name} {_eps(eps)}") for name, eps in stages)
        lines.append(f"ε by stage (each alone): {parts}")
    else:
        lines.append("Nothing spent yet.")
    return _card("Privacy (DP guarantee)", headline, lines, badge)


def summary_synthetic(run_dir: RunDir, full: bool = False) -> str:
    meta = _load(run_dir.root / "generator" / "generator.json")
    meta = meta if isinstance(meta, dict) else {}
    sampled = _load(run_dir.root / "sample" / "report.json")
    written = sampled.get("written") if isinstance(sampled, dict) else None
    filtered_path = run_dir.root / "filter" / "filtered.parquet"
    filtered = _rows(filtered_path) if filtered_path.exists() else None
    lines = []
    if filtered is not None:
        headline = f"{filtered:,} <small>synthetic instructions</small>"
        kept = f"from {written:,} sampled candidates" if isinstance(written, int) else ""
        lines.append(f"kept by the DP filter {kept}".rstrip())
    elif isinstance(written, int):
        headline = f"{written:,} <small>sampled candidates</small>"
        lines.append("not filtered yet")
    else:
        headline = "none yet"
        lines.append("Sampling has not run.")
    generator = [
        f"{label} <b>{html.escape(str(meta[key]))}</b>"
        for key, label in (("strategy", "strategy"), ("format", "format"))
        if meta.get(key) not in (None, "")
    ]
    if meta.get("base_model"):
        generator.append(f"base model <code>{html.escape(str(meta['base_model']))}</code>")
    if generator:
        lines.append("Generator: " + " · ".join(generator))
    return _card("Synthetic instructions", headline, lines)


def _triple(block, digits: int = 2) -> str:
    """``filtered X (unfiltered Y, real-vs-real Z)`` or why not measured."""
    why = _why_not(block)
    if why:
        return why
    filtered = _number(block.get("filtered"))
    if filtered is None:
        return "not measured"
    others = [
        f"{label} {value:.{digits}f}"
        for key, label in (("unfiltered", "unfiltered"), ("real_floor", "real-vs-real"))
        if (value := _number(block.get(key))) is not None
    ]
    tail = f" ({', '.join(others)})" if others else ""
    return f"filtered <b>{filtered:.{digits}f}</b>{tail}"


def _gap_closed(fed) -> str:
    why = _why_not(fed)
    if why:
        return why
    closed = _number(fed.get("gap_closed"))
    if closed is None:
        if "gap_closed" in fed and fed.get("gap_closed") is None and "fed" in fed:
            return "undefined (unfiltered FED is already at the real-vs-real floor)"
        return "not measured"
    corrected = _number(fed.get("gap_closed_bias_corrected"))
    tail = f" (bias-corrected {corrected:.0%})" if corrected is not None else ""
    return f"<b>{closed:.0%}</b>{tail}"


def summary_distribution(run_dir: RunDir, full: bool = False) -> str:
    source = nondp_file(run_dir, "filter", "metrics.json", full)
    if source is None and (run_dir.private_root / "filter" / "metrics.json").exists():
        return _card(
            "Distribution match",
            None,
            [_in_private_report("Measured (probe accuracy, MAUVE, FED gap closed)")],
        )
    metrics = _load(source) if source is not None else None
    held = _number(metrics.get("heldout_records")) if isinstance(metrics, dict) else None
    split = f"{int(held):,} held-out real records" if held else "the held-out real split"
    note = (
        f"Non-DP evaluation on {split}: for judging the filter only, not covered by the "
        "privacy guarantee."
    )
    if not isinstance(metrics, dict):
        ran = (run_dir.root / "filter" / "filtered.parquet").exists()
        why = "The filter ran with filter.metrics off." if ran else "The filter has not run."
        return _card("Distribution match", "not measured", [why], note=note)
    if "skipped" in metrics or "error" in metrics:
        return _card("Distribution match", "not measured", [_why_not(metrics)], note=note)
    lines = [
        f"Probe accuracy (real vs synthetic; 0.5 = indistinguishable): "
        f"{_triple(metrics.get('probe'))}",
        f"MAUVE (higher = closer to real): {_triple(metrics.get('mauve'))}",
        f"FED gap closed by filtering: {_gap_closed(metrics.get('fed'))}",
    ]
    return _card("Distribution match", None, lines, note=note)


def summary_win_rates(run_dir: RunDir, full: bool = False) -> str:
    source = win_rates_file(run_dir, full)
    if source is None and (run_dir.private_root / "evaluate" / "win_rates.json").exists():
        return _card(
            "Win rate",
            None,
            [
                _in_private_report("Measured")
                + " Declare public evaluation data (<code>evaluate.data_path</code>, "
                "<code>evaluate.data_public: true</code>) to publish win rates."
            ],
        )
    data = _load(source) if source is not None else None
    comparisons = data.get("comparisons") if isinstance(data, dict) else None
    if not isinstance(comparisons, dict) or not comparisons:
        return _card("Win rate", "not measured", ["Evaluation has not run."])
    confidence = _number(data.get("confidence"))
    level = f"{confidence:.0%} " if confidence is not None else ""
    lines = []
    for key, result in comparisons.items():
        name = html.escape(key.replace("_", " "))
        rate = _number(result.get("win_rate")) if isinstance(result, dict) else None
        if rate is None:
            lines.append(f"{name}: not measured")
            continue
        low, high = _number(result.get("ci_low")), _number(result.get("ci_high"))
        interval = (
            f", {level}CI {low:.2f}–{high:.2f}" if low is not None and high is not None else ""
        )
        n = result.get("n")
        count = f", n={n}" if isinstance(n, int) else ""
        lines.append(f"{name}: <b>{rate:.2f}</b>{interval}{count}")
    source = data.get("source")
    where = (
        "held-out real instructions"
        if source == "heldout"
        else f"<code>{html.escape(str(source))}</code>"
    )
    judge = html.escape(str(data.get("judge", "?")))
    note = f"Judged by {judge} on {where}; ties count half. Non-DP evaluation."
    return _card("Win rate", None, lines, note=note)


def summary_leaks(run_dir: RunDir, full: bool = False) -> str:
    data = _load(run_dir.root / "audit" / "leaks.json")
    if not isinstance(data, dict):
        return _card("Leak scan", "not run", ["The final leak scan has not run."])
    leaks = data.get("leaks_total")
    memorised = data.get("memorised_total")
    if not isinstance(leaks, int):
        return _card("Leak scan", "not measured", ["audit/leaks.json has no leak count."])
    if leaks > 0:
        badge = ("bad", "private text in public files")
    elif isinstance(memorised, int) and memorised > 0:
        badge = ("warn", "memorised generations")
    else:
        badge = ("ok", "clean")
    noun = "leak" if leaks == 1 else "leaks"
    lines = [
        f"{data.get('files_scanned', '?')} public files scanned for "
        f"{data.get('private_texts_indexed', '?')} private texts "
        f"(≥{data.get('min_tokens', '?')} tokens)"
    ]
    if isinstance(memorised, int):
        lines.append(f"{memorised} synthetic generations reproduce a private instruction")
    return _card("Leak scan", f"{leaks} {noun}", lines, badge)


SUMMARY = [
    summary_privacy,
    summary_synthetic,
    summary_distribution,
    summary_win_rates,
    summary_leaks,
]


def section_summary(run_dir: RunDir, full: bool = False) -> str:
    cards = "".join(build(run_dir, full) for build in SUMMARY)
    return f'<section id="summary"><h2>At a glance</h2><div class="cards">{cards}</div></section>'


# ------------------------------------------------------------------------------ details


def section_ledger(run_dir: RunDir, full: bool = False) -> str:
    if not run_dir.ledger_path.exists():
        return _missing("Ingestion")
    ledger = Ledger.load(run_dir.ledger_path)
    acc = ledger.accounting()
    rows = [[stage, eps] for stage, eps in ledger.per_stage()]
    events = [
        [
            e.stage,
            e.mechanism,
            json.dumps(
                {k: v for k, v in e.to_dict().items() if k not in ("stage", "mechanism", "run_id")}
            ),
        ]
        for e in ledger.events
    ]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.6))
    names = [r[0] for r in rows] + ["composed total"]
    values = [r[1] for r in rows] + [acc.epsilon]
    ax.barh(names, values, color=["#4c72b0"] * len(rows) + ["#dd8452"])
    ax.axvline(ledger.target_epsilon, color="black", linestyle="--", label="target ε")
    ax.set_xlabel("ε (each stage alone at the run's δ; total composed)")
    ax.legend(loc="lower right")
    summary = (
        f"<p><b>Privacy unit:</b> {html.escape(ledger.unit)} &nbsp; <b>δ:</b> "
        f"{ledger.target_delta:.3g} &nbsp; <b>spent ε:</b> {acc.epsilon:.4f} of "
        f"{ledger.target_epsilon:.4g} (accountant: {acc.accountant}; RDP cross-check "
        f"{acc.rdp_epsilon:.4f})</p>"
    )
    return (
        summary
        + _img(_png(fig), "epsilon per stage")
        + _table(rows, ["stage", "ε"])
        + _details(
            f"Ledger events ({len(events)}): mechanism and noise parameters",
            _table(events, ["stage", "mechanism", "parameters"]),
        )
    )


def section_untrained_generator(meta: dict) -> str:
    """prompted / private_evolution: no training curve; what the strategy did instead."""
    strategy = meta.get("strategy", "")
    rows = [
        [k, meta[k]]
        for k in (
            "strategy",
            "format",
            "base_model",
            "rounds",
            "population",
            "kept_per_round",
            "noise_multiplier",
            "sigma",
            "seconds",
        )
        if k in meta
    ]
    prompts = meta.get("prompts") or []
    rows.append(["prompts sampling starts from", len(prompts)])
    if meta.get("topics"):
        rows.append(["public topics", len(meta["topics"])])
    parts = [_table(rows, ["setting", "value"])]
    if strategy == "prompted":
        parts.append(
            "<p>No training: the base model with public prompts. No private data was read "
            "before the DP filter, which spent the whole budget.</p>"
        )
    history = meta.get("history") or []
    if history:
        keys = ["round", "candidates", "kept", "ended_with_stop", "reused_release"]
        parts.append(
            "<p>Private Evolution rounds: each round one Gaussian release of the private "
            "records' nearest-candidate votes (see the ledger); the kept candidates and their "
            "variations form the next round.</p>"
        )
        parts.append(_table([[h.get(k) for k in keys] for h in history], keys))
    return "".join(parts)


def training_epsilon(run_dir: RunDir) -> float | None:
    """The generator training's ε in the ledger (its events alone), or None before it spent."""
    if not run_dir.ledger_path.exists():
        return None
    return dict(Ledger.load(run_dir.ledger_path).per_stage()).get("train-generator")


def section_training(run_dir: RunDir, full: bool = False) -> str:
    metrics_path = run_dir.root / "generator" / "metrics.jsonl"
    meta_path = run_dir.root / "generator" / "generator.json"
    if not metrics_path.exists():
        meta = read_json(meta_path) if meta_path.exists() else {}
        if meta.get("strategy") in ("prompted", "private_evolution"):
            return section_untrained_generator(meta)
        return _missing("Generator training")
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    # step times track the realised Poisson batch: private/train/metrics.jsonl, private page only
    timed_path = nondp_file(run_dir, "train", "metrics.jsonl", full)
    timed = []
    if timed_path is not None and timed_path.exists():
        timed = [json.loads(line) for line in timed_path.read_text().splitlines() if line]
        timed = [m for m in timed if "step_seconds" in m]
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(9 if timed else 4.5, 2.8))
    a1 = axes[0] if timed else axes
    steps = [m["step"] for m in metrics]
    a1.plot(steps, [m.get("epsilon") or 0 for m in metrics], marker=".", label="bound per step")
    a1.set_xlabel("executed step")
    a1.set_ylabel("ε spent, upper bound")
    final = training_epsilon(run_dir)
    if final is not None:
        a1.axhline(final, color="black", linestyle="--", linewidth=1, label=f"final {final:.3g}")
        a1.legend(fontsize=7, loc="lower right")
    if timed:
        axes[1].plot(
            [m["step"] for m in timed], [m["step_seconds"] for m in timed], ".", color="#55a868"
        )
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("seconds per step (non-DP)")
    meta = read_json(meta_path) if meta_path.exists() else {}
    keys = [
        "strategy",
        "format",
        "units",
        "sampling_rate",
        "steps",
        "executed_steps",
        "noise_multiplier",
        "clip_norm",
        "noise",
        "num_workers",
        "trainable_parameters",
        "base_model",
    ]
    rows = [[k, meta[k]] for k in keys if k in meta]
    note = (
        "<p>After each step the ledger records an upper bound on training's ε: the smaller of "
        "the RDP bound of the steps so far and the exact cost of the whole planned run (restart "
        "headroom included); the dashed line is the exact cost of the steps executed, what the "
        "ledger holds at the end.  "
        "The training loss is computed on private batches without DP, so it is kept in "
        "<code>private/train/metrics.jsonl</code> and not shown here"
        + (
            "; step times (they track the realised batch size) are in the private report.</p>"
            if not full
            else "; step times (non-DP: they track the realised batch size) are plotted on "
            "the right.</p>"
        )
    )
    settings = _details(f"Generator settings ({len(rows)})", _table(rows, ["setting", "value"]))
    return _img(_png(fig), "training curves") + note + (settings if rows else "")


def section_filter(run_dir: RunDir, full: bool = False) -> str:
    folder = run_dir.root / "filter"
    if not folder.exists():
        return _missing("DP filtering")
    parts = [_file_img(p, p.stem) for p in sorted(folder.glob("*.png"))]
    metrics_path = nondp_file(run_dir, "filter", "metrics.json", full)
    if metrics_path is None:
        parts.append(
            "<p>"
            + _in_private_report("Distribution metrics (and the cluster shares plot)")
            + "</p>"
        )
    else:
        plot_path = metrics_path.with_name("cluster_shares.png")
        if plot_path.exists():
            parts.append(_file_img(plot_path, "cluster shares (non-DP, held-out split)"))
    if metrics_path is not None and metrics_path.exists():
        metrics = read_json(metrics_path)
        if isinstance(metrics, dict) and metrics.get("note"):
            parts.append(f'<p class="note">{html.escape(str(metrics["note"]))}</p>')
        flat = _flatten(metrics)
        parts.append(
            _details(
                f"All distribution metrics ({len(flat)} values, non-DP, held-out split)",
                _table([[k, v] for k, v in flat], ["metric", "value"]),
            )
        )
    report = folder / "report.json"
    if report.exists():
        flat = _flatten(read_json(report))
        parts.append(
            _details(
                f"Filter report ({len(flat)} values)",
                _table([[k, v] for k, v in flat], ["key", "value"]),
            )
        )
    if not parts:
        return '<p class="missing">The DP filter wrote no evaluation metrics or plots.</p>'
    return "".join(parts)


def _flatten(data, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            rows += _flatten(value, f"{prefix}{key}.")
    elif isinstance(data, list) and len(data) > 12:
        rows.append((prefix.rstrip("."), f"[{len(data)} values]"))
    else:
        rows.append((prefix.rstrip("."), data if not isinstance(data, list) else json.dumps(data)))
    return rows


def sample_texts(texts: list[str], k: int = SAMPLE_ROWS, seed: int = SAMPLE_SEED) -> list[str]:
    """A seeded random sample of ``k`` texts, in their file order: the same on every render."""
    if len(texts) <= k:
        return list(texts)
    picked = sorted(random.Random(seed).sample(range(len(texts)), k))
    return [texts[i] for i in picked]


def section_samples(run_dir: RunDir, full: bool = False) -> tuple[str, str]:
    import pyarrow.parquet as pq

    title = "Synthetic instructions"
    filtered = run_dir.root / "filter" / "filtered.parquet"
    shards = sorted((run_dir.root / "sample").glob("*.parquet"))
    sources = [filtered] if filtered.exists() else shards
    if not sources:
        return title, _missing("Sampling")
    texts = [
        t
        for source in sources
        for t in pq.read_table(source, columns=["text"]).column("text").to_pylist()
    ]
    shown = sample_texts(texts)
    items = "".join(f"<li>{html.escape(str(t))}</li>" for t in shown)
    which = "filtered set" if filtered.exists() else "unfiltered candidates"
    where = ", ".join(
        f"<code>{html.escape(str(s.relative_to(run_dir.root)))}</code>" for s in sources[:3]
    )
    where += ", …" if len(sources) > 3 else ""
    if len(shown) < len(texts):
        heading = f"{title}: a random sample of {len(shown)} of {len(texts)} ({which})"
        note = (
            f"<p>Drawn with a fixed seed ({SAMPLE_SEED}), so every render of this run shows the "
            f"same ones, in file order, from {where} (DP output).</p>"
        )
    else:
        heading = f"{title}: all {len(texts)} ({which})"
        note = f"<p>From {where} (DP output).</p>"
    return heading, f"{note}<ol>{items}</ol>"


def section_evaluation(run_dir: RunDir, full: bool = False) -> str:
    source = win_rates_file(run_dir, full)
    if source is None:
        return "<p>" + _in_private_report("Win rates were measured") + "</p>"
    folder = source.parent
    if not folder.exists():
        return _missing("Evaluation")
    parts = [_file_img(p, p.stem) for p in sorted(folder.glob("*.png"))]
    for path in sorted(folder.glob("*.json")):
        flat = _flatten(read_json(path))
        parts.append(
            _details(
                f"{path.stem} ({len(flat)} values)",
                _table([[k, v] for k, v in flat], ["key", "value"]),
            )
        )
    return "".join(parts)


def section_audit(run_dir: RunDir, full: bool = False) -> str:
    folder = run_dir.root / "audit"
    parts = []
    leaks = folder / "leaks.json"
    if leaks.exists():
        data = read_json(leaks)
        parts.append(
            f"<p><b>Leak scan:</b> {data['files_scanned']} public files, "
            f"<b>{data['leaks_total']}</b> leaks outside <code>private/</code> (private text, "
            "or statistics of real records the ledger does not cover), "
            f"{data['memorised_total']} synthetic generations reproducing a private instruction "
            f"(≥{data['min_tokens']} tokens).</p>"
        )
        statistics = data.get("nondp_statistics_by_file") or {}
        if statistics:
            parts.append(
                _details(
                    f"Public files with non-DP statistics of real records ({len(statistics)})",
                    _table([[k, v] for k, v in statistics.items()], ["file", "why"]),
                )
            )
        for key, label in (
            ("leaks_by_file", "Files with private text"),
            ("memorised_by_file", "Files with memorised generations"),
        ):
            by_file = data.get(key) or {}
            if by_file:
                parts.append(
                    _details(
                        f"{label} ({len(by_file)})",
                        _table([[k, v] for k, v in by_file.items()], ["file", "hits"]),
                    )
                )
    mia = nondp_file(run_dir, "audit", "mia.json", full)
    if mia is None:
        parts.append(
            "<p>The membership and canary audit (<code>dpray audit mia</code>) trains models "
            "on real records outside the ledger: its results are in the private report only.</p>"
        )
    elif mia.exists():
        data = read_json(mia)
        rows = []
        for name, result in data["results"].items():
            for canary in result["canaries"]:
                rows.append(
                    [
                        name,
                        result["epsilon"],
                        result["mia_auc"],
                        canary["repeats"],
                        canary["exposure_bits"],
                    ]
                )
        parts.append("<h3>Membership and canary audit</h3>")
        parts.append(_table(rows, ["model", "ε", "MIA AUC", "canary repeats", "exposure (bits)"]))
        parts.append(f"<p>{html.escape(data['note'])}</p>")
    return "".join(parts) or _missing("The privacy audit")


def section_timings(run_dir: RunDir, full: bool = False) -> str:
    path = run_dir.root / "timings" / "stages.json"
    if not path.exists():
        return _missing("Timing")
    timings = read_json(path)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(timings) + 1))
    ax.barh(list(timings), list(timings.values()), color="#8172b3")
    ax.set_xlabel("seconds")
    return _img(_png(fig), "stage timings") + _details(
        f"Seconds per stage ({len(timings)})",
        _table([[k, v] for k, v in timings.items()], ["stage", "seconds"]),
    )


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #4c72b0} h2{margin-top:2em;color:#4c72b0}
h2.part{border-bottom:1px solid #ccc;color:#222;margin-top:2.5em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.missing{color:#888;font-style:italic} code{background:#f4f4f4;padding:1px 3px}
.note{color:#555;font-size:.9em}
#summary h2{margin-top:1em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px;
align-items:start}
.card{border:1px solid #d0d7e2;border-radius:6px;padding:.6em .9em;background:#fafbfd}
.card h3{margin:0 0 .3em;font-size:.85em;text-transform:uppercase;letter-spacing:.04em;color:#4c72b0}
.card .headline{margin:.2em 0;font-size:1.35em;font-weight:600}
.card .headline small{font-size:.65em;font-weight:normal;color:#555}
.card .note{margin:.4em 0 0} .nw{white-space:nowrap}
.card ul{margin:.3em 0 0;padding-left:1.1em;font-size:.9em} .card li{margin:.15em 0}
.badge{font-size:.55em;font-weight:600;padding:2px 7px;border-radius:9px;vertical-align:middle}
.badge.ok{background:#e3f4e6;color:#1e6b2e} .badge.warn{background:#fff1d6;color:#8a5a00}
.badge.bad{background:#fde2e1;color:#a11d17}
details{margin:.5em 0} summary{cursor:pointer;color:#4c72b0}
"""

SECTIONS = [
    ("Privacy ledger", section_ledger),
    ("Generator", section_training),
    ("Distribution match (DP filter)", section_filter),
    ("Synthetic instructions", section_samples),
    ("Win rates", section_evaluation),
    ("Privacy audit", section_audit),
    ("Stage timings", section_timings),
]


def write_report(run_dir: RunDir, full: bool = False) -> Path:
    """The public page (``report/index.html``), or with ``full`` the private one
    (``private/report/index.html``) that also shows the non-DP statistics under ``private/``."""
    zone = (
        "Private report: also shows non-DP statistics of real records. Keep it in "
        "<code>private/</code>; the public report is <code>report/index.html</code>."
        if full
        else "Public report: DP outputs and public figures only. The data owner's "
        f"private report (non-DP statistics of real records) is <code>{PRIVATE_REPORT}</code>."
    )
    body = [
        f"<h1>dpray run report{' (private)' if full else ''}</h1>"
        f'<p><code>{html.escape(str(run_dir.root))}</code></p><p class="note">{zone}</p>',
        section_summary(run_dir, full),
        '<h2 class="part" id="details">Details</h2>',
    ]
    for title, build in SECTIONS:
        built = build(run_dir, full)
        if isinstance(built, tuple):  # a section whose heading depends on what it found
            title, built = built
        body.append(f"<h2>{html.escape(title)}</h2>{built}")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>dpray report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    folder = run_dir.private("report") if full else run_dir.public("report")
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    if full:
        path.chmod(0o600)
    return path


def write_reports(run_dir: RunDir) -> dict[str, Path]:
    """Both pages: ``{"report": public, "private_report": private}``."""
    return {
        "report": write_report(run_dir),
        "private_report": write_report(run_dir, full=True),
    }


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    return StageResult(outputs={k: str(v) for k, v in write_reports(run_dir).items()})


def _public_inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    """What the reports show, minus what the pipeline rewrites after every run.

    ``timings/`` gets this stage's own time when it finishes and ``audit/leaks.json`` is written
    by the final leak scan; counting them would make every rerun redo the report.  ``dpray run``
    rewrites the report after the leak scan anyway, so the final report is always current.
    """
    skip = (
        run_dir.root / "report",
        run_dir.root / "timings",
        run_dir.root / "audit" / "leaks.json",
    )
    public = [p for p in run_dir.public_files() if not any(p.is_relative_to(s) for s in skip)]
    private = run_dir.private_root
    aggregates = [
        private / "filter" / "metrics.json",
        private / "filter" / "cluster_shares.png",
        private / "evaluate" / "win_rates.json",
        private / "audit" / "mia.json",
        private / "train" / "metrics.jsonl",
    ]
    return public + aggregates


STAGE = register(
    Stage(
        name="report",
        run=run,
        help="Write the human reports: RUN_DIR/report/index.html (public) and "
        "RUN_DIR/private/report/index.html (with non-DP statistics; self-contained pages).",
        reads="public artifacts of the run; private aggregates (metrics, win rates, audit) for "
        "the private page",
        writes="report/index.html, private/report/index.html",
        sections=(),
        inputs=_public_inputs,
    )
)
