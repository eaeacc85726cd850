"""``dpray report``: one self-contained HTML page a person can open offline.

Reads only public artifacts of a run (the ledger, stage reports, DP outputs, evaluation
aggregates) and writes ``RUN_DIR/report/index.html`` with every plot inlined as a PNG data URI, so
the file can be mailed or attached to a ticket.  Sections for stages that have not run say so
instead of failing.  Nothing under ``private/`` is read: the report is as public as its inputs.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from dpray.config import DprayConfig
from dpray.privacy.ledger import Ledger
from dpray.rundir import RunDir, read_json
from dpray.stages.base import Stage, StageResult, register

SAMPLE_ROWS = 25


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


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def section_ledger(run_dir: RunDir) -> str:
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
        + "<h3>Events</h3>"
        + _table(events, ["stage", "mechanism", "parameters"])
    )


def section_training(run_dir: RunDir) -> str:
    metrics_path = run_dir.root / "generator" / "metrics.jsonl"
    meta_path = run_dir.root / "generator" / "generator.json"
    if not metrics_path.exists():
        return _missing("Generator training")
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 2.8))
    steps = [m["step"] for m in metrics]
    a1.plot(steps, [m.get("epsilon") or 0 for m in metrics], marker=".")
    a1.set_xlabel("executed step")
    a1.set_ylabel("ε so far (ledger)")
    a2.plot(steps, [m["step_seconds"] for m in metrics], marker=".", color="#55a868")
    a2.set_xlabel("step")
    a2.set_ylabel("seconds per step")
    meta = read_json(meta_path) if meta_path.exists() else {}
    keys = [
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
        "<p>The training loss is computed on private batches without DP, so it is kept in "
        "<code>private/train/metrics.jsonl</code> and not shown here.</p>"
    )
    return _img(_png(fig), "training curves") + note + _table(rows, ["setting", "value"])


def section_filter(run_dir: RunDir) -> str:
    folder = run_dir.root / "filter"
    if not folder.exists():
        return _missing("DP filtering")
    parts = [_file_img(p, p.stem) for p in sorted(folder.glob("*.png"))]
    metrics_path = folder / "metrics.json"
    if metrics_path.exists():
        metrics = read_json(metrics_path)
        flat = _flatten(metrics)
        parts.append("<h3>Distribution metrics</h3>")
        parts.append(_table([[k, v] for k, v in flat], ["metric", "value"]))
    report = folder / "report.json"
    if report.exists():
        parts.append("<h3>Filter report</h3>")
        parts.append(_table([[k, v] for k, v in _flatten(read_json(report))], ["key", "value"]))
    return "".join(parts) or _missing("DP filtering")


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


def section_samples(run_dir: RunDir) -> str:
    import pyarrow.parquet as pq

    filtered = run_dir.root / "filter" / "filtered.parquet"
    shards = sorted((run_dir.root / "sample").glob("*.parquet"))
    source = filtered if filtered.exists() else (shards[0] if shards else None)
    if source is None:
        return _missing("Sampling")
    texts = pq.read_table(source, columns=["text"]).column("text").to_pylist()[:SAMPLE_ROWS]
    items = "".join(f"<li>{html.escape(t)}</li>" for t in texts)
    where = source.relative_to(run_dir.root)
    return f"<p>First {len(texts)} synthetic instructions from <code>{where}</code> (DP output).</p><ol>{items}</ol>"


def section_evaluation(run_dir: RunDir) -> str:
    folder = run_dir.root / "evaluate"
    if not folder.exists():
        return _missing("Evaluation")
    parts = [_file_img(p, p.stem) for p in sorted(folder.glob("*.png"))]
    for path in sorted(folder.glob("*.json")):
        parts.append(f"<h3>{html.escape(path.stem)}</h3>")
        parts.append(_table([[k, v] for k, v in _flatten(read_json(path))], ["key", "value"]))
    return "".join(parts)


def section_audit(run_dir: RunDir) -> str:
    folder = run_dir.root / "audit"
    parts = []
    leaks = folder / "leaks.json"
    if leaks.exists():
        data = read_json(leaks)
        parts.append(
            f"<p><b>Leak scan:</b> {data['files_scanned']} public files, "
            f"<b>{data['leaks_total']}</b> private texts found outside <code>private/</code>, "
            f"{data['memorised_total']} synthetic generations reproducing a private instruction "
            f"(≥{data['min_tokens']} tokens).</p>"
        )
    mia = folder / "mia.json"
    if mia.exists():
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


def section_timings(run_dir: RunDir) -> str:
    path = run_dir.root / "timings" / "stages.json"
    if not path.exists():
        return _missing("Timing")
    timings = read_json(path)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(timings) + 1))
    ax.barh(list(timings), list(timings.values()), color="#8172b3")
    ax.set_xlabel("seconds")
    return _img(_png(fig), "stage timings") + _table(
        [[k, v] for k, v in timings.items()], ["stage", "seconds"]
    )


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #4c72b0} h2{margin-top:2em;color:#4c72b0}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
.missing{color:#888;font-style:italic} code{background:#f4f4f4;padding:1px 3px}
"""

SECTIONS = [
    ("Privacy ledger", section_ledger),
    ("Generator training", section_training),
    ("Distribution match (DP filter)", section_filter),
    ("Synthetic instructions", section_samples),
    ("Win rates", section_evaluation),
    ("Privacy audit", section_audit),
    ("Stage timings", section_timings),
]


def write_report(run_dir: RunDir) -> Path:
    body = [f"<h1>dpray run report</h1><p><code>{html.escape(str(run_dir.root))}</code></p>"]
    for title, build in SECTIONS:
        body.append(f"<h2>{html.escape(title)}</h2>{build(run_dir)}")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>dpray report</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    path = run_dir.public("report") / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    path = write_report(run_dir)
    return StageResult(outputs={"report": str(path)})


def _public_inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    """What the report shows, minus what the pipeline rewrites after every run.

    ``timings/`` gets this stage's own time when it finishes and ``audit/leaks.json`` is written
    by the final leak scan; counting them would make every rerun redo the report.  ``dpray run``
    rewrites the report after the leak scan anyway, so the final report is always current.
    """
    skip = (
        run_dir.root / "report",
        run_dir.root / "timings",
        run_dir.root / "audit" / "leaks.json",
    )
    return [p for p in run_dir.public_files() if not any(p.is_relative_to(s) for s in skip)]


STAGE = register(
    Stage(
        name="report",
        run=run,
        help="Write the human report RUN_DIR/report/index.html (self-contained).",
        reads="public artifacts of the run (ledger, reports, DP outputs, evaluation aggregates)",
        writes="report/index.html",
        sections=(),
        inputs=_public_inputs,
    )
)
