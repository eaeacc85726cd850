"""Stage order, completion markers, skip-if-done.

A stage is *done* when its marker exists and records the same fingerprint as now -- a hash of the
config sections it depends on and of the content of the files it reads -- and every output it
recorded still exists with the content it had when the stage finished.  ``dpray run`` walks the
stage list and reruns exactly the stages whose fingerprint changed or whose outputs are gone or
changed (and so, through their outputs, everything downstream whose inputs changed).  Markers name
files relative to the run directory, so a moved or renamed run directory is still done.  Markers
hash private inputs, so they live under ``private/state/``.

Rerunning a DP stage (``force``, or a marker that no longer holds) does not spend the budget
again: the stage reuses its saved release (:mod:`dpray.privacy.releases`).  Only
``spend_again`` draws new releases, and the ledger composes them with the earlier ones.
"""

from __future__ import annotations

import hashlib
import logging
import time

import dpray
from dpray.config import ConfigError, DprayConfig
from dpray.privacy.releases import SPEND_AGAIN_FLAG, spending_again
from dpray.rundir import (
    RunDir,
    file_digest,
    read_json,
    relative_to_run,
    resolve_in_run,
    write_json,
)
from dpray.stages import STAGE_ORDER, STAGES
from dpray.stages.base import Stage, StageResult

log = logging.getLogger(__name__)


def fingerprint(stage: Stage, config: DprayConfig, run_dir: RunDir) -> dict:
    """What a stage's result depends on: its config sections and its input files (named
    relative to the run directory, so moving the directory changes nothing)."""
    inputs = {
        relative_to_run(run_dir.root, p): file_digest(p)
        for p in stage.inputs(config, run_dir)
        if p.exists()
    }
    combined = hashlib.sha256(
        (config.section_hash(*stage.sections) + repr(sorted(inputs.items()))).encode()
    ).hexdigest()[:16]
    return {"fingerprint": combined, "config": config.section_hash(*stage.sections)}


def output_records(run_dir: RunDir, outputs: dict[str, str]) -> dict[str, dict]:
    """A marker's outputs: each path relative to the run directory, with its content digest."""
    records = {}
    for key, path in outputs.items():
        absolute = resolve_in_run(run_dir.root, path)
        records[key] = {
            "path": relative_to_run(run_dir.root, absolute),
            "sha256": file_digest(absolute) if absolute.exists() else None,
        }
    return records


def outputs_intact(run_dir: RunDir, recorded: dict) -> bool:
    """Every recorded output exists under this run directory with its recorded content.
    (A marker of an older dpray, with bare absolute paths, is not trusted.)"""
    for item in recorded.values():
        if not isinstance(item, dict) or not item.get("sha256"):
            return False
        path = resolve_in_run(run_dir.root, item["path"])
        if not path.exists() or file_digest(path) != item["sha256"]:
            return False
    return True


def is_done(stage: Stage, config: DprayConfig, run_dir: RunDir) -> bool:
    marker = run_dir.marker(stage.name)
    if not marker.exists():
        return False
    recorded = read_json(marker)
    if recorded.get("fingerprint") != fingerprint(stage, config, run_dir)["fingerprint"]:
        return False
    return outputs_intact(run_dir, recorded.get("outputs", {}))


def refresh_marker(run_dir: RunDir, name: str) -> None:
    """Re-record a finished stage's output digests (the pipeline rewrites the report after the
    leak scan; the stage is still done)."""
    path = run_dir.marker(name)
    if path.exists():
        marker = read_json(path)
        outputs = {
            k: v["path"] for k, v in marker.get("outputs", {}).items() if isinstance(v, dict)
        }
        marker["outputs"] = output_records(run_dir, outputs)
        write_json(path, marker)


def run_stage(
    stage: Stage,
    config: DprayConfig,
    run_dir: RunDir,
    force: bool = False,
    spend_again: bool = False,
) -> StageResult | None:
    """Run one stage unless done; write its marker.  Returns None when skipped.

    ``force`` reruns a done stage; a DP stage then reuses its saved release (no new spend).
    ``spend_again`` (implies ``force``) makes a DP stage draw a new release: a second spend,
    composed with the first on the ledger.
    """
    if not (force or spend_again) and is_done(stage, config, run_dir):
        log.info("%s: already done with this config and these inputs; skipped", stage.name)
        return None
    if spend_again and stage.spends_budget:
        log.warning(
            "%s: %s: DP releases are drawn anew and spend the budget again",
            stage.name,
            SPEND_AGAIN_FLAG,
        )
    if stage.needs_ray:
        from dpray.runtime import ensure_ray

        ensure_ray(config, run_dir)
    log.info("%s: started", stage.name)
    start = time.monotonic()
    try:
        with spending_again(spend_again):
            result = stage.run(config, run_dir)
    finally:
        # Whatever the stage and its Ray workers wrote under private/, on whatever umask, ends
        # up owner-only (the 0700 zone root already shut it off from everyone else meanwhile).
        run_dir.protect_private()
    seconds = time.monotonic() - start
    marker = fingerprint(stage, config, run_dir)  # inputs hashed before outputs are trusted
    marker.update(
        {
            "stage": stage.name,
            "dpray_version": dpray.__version__,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 3),
            "outputs": output_records(run_dir, result.outputs),
        }
    )
    write_json(run_dir.marker(stage.name), marker)  # mkstemp: 0600
    _record_timing(run_dir, stage.name, seconds)
    log.info("%s: finished in %.1f s", stage.name, seconds)
    return result


def _record_timing(run_dir: RunDir, name: str, seconds: float) -> None:
    path = run_dir.public("timings") / "stages.json"
    timings = read_json(path) if path.exists() else {}
    timings[name] = round(seconds, 3)
    write_json(path, timings)


class LeakError(RuntimeError):
    """The final leak scan found private text in a public artifact."""


def final_leak_scan(config: DprayConfig, run_dir: RunDir) -> dict:
    """Scan every public file (and the run's logs); fail on private text outside generations
    that does not already stand in the run's public inputs (see :mod:`dpray.audit.leaks`)."""
    from dpray.audit.leaks import scan

    logs = sorted(run_dir.logs.glob("*.log"))
    report = scan(run_dir, min_tokens=config.audit.leak_min_tokens, extra_files=logs, config=config)
    write_json(run_dir.public("audit") / "leaks.json", report.to_dict())
    log.info(
        "leak scan: %d public files, %d leaks, %d memorised generations, "
        "%d matches of text in the public inputs (%d files indexed; not leaks)",
        report.files_scanned,
        report.leak_count,
        sum(report.memorised.values()),
        sum(report.public_origin.values()),
        report.public_inputs,
    )
    if report.leak_count and config.audit.fail_on_leak:
        parts = []
        if report.leaks:
            parts.append(f"private text in public files {sorted(report.leaks)}")
        if report.statistics:
            parts.append(
                f"non-DP statistics of real records outside private/ {sorted(report.statistics)}"
            )
        raise LeakError(
            f"{report.leak_count} leaks: {'; '.join(parts)} "
            f"(see {run_dir.root / 'audit' / 'leaks.json'})"
        )
    return report.to_dict()


def run_pipeline(
    config: DprayConfig,
    run_dir: RunDir,
    stages: list[str] | None = None,
    force: bool = False,
    spend_again: bool = False,
) -> dict[str, StageResult | None]:
    """Run the stages in order, skipping completed ones (see :func:`run_stage` for ``force``
    and ``spend_again``)."""
    unknown = sorted(set(config.skip_stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"skip_stages: unknown stage(s) {unknown}; known: {sorted(STAGES)}")
    names = stages or [
        name for name in STAGE_ORDER if name in STAGES and name not in config.skip_stages
    ]
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; known: {sorted(STAGES)}")
    results: dict[str, StageResult | None] = {}
    for name in names:
        results[name] = run_stage(
            STAGES[name], config, run_dir, force=force, spend_again=spend_again
        )
    if stages is None:
        # The leak scan runs last, over everything public including the report; the report is
        # then rewritten to show the scan's result (and scanned once more).
        final_leak_scan(config, run_dir)
        if "report" in STAGES:
            from dpray.stages.report import write_reports

            write_reports(run_dir)
            refresh_marker(run_dir, "report")  # rewritten, not rerun: still done
            final_leak_scan(config, run_dir)
    return results
