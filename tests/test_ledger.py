"""The ledger: schema, recomputation with dp-accounting, refusal of overspending."""

from __future__ import annotations

import json

import dp_accounting
import pytest

from dpray.privacy.events import (
    GaussianEvent,
    PoissonSubsampledGaussianEvent,
    PrivacyEvent,
)
from dpray.privacy.ledger import BudgetExceededError, Ledger

DELTA = 1e-5


def recompute_pld(events: list[dict], delta: float) -> float:
    """Independent recomputation straight from the JSON events (no dpray code)."""
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for e in events:
        if e["mechanism"] == "poisson_subsampled_gaussian":
            accountant.compose(
                dp_accounting.PoissonSampledDpEvent(
                    e["sampling_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])
                ),
                e["steps"],
            )
        elif e["mechanism"] == "gaussian":
            accountant.compose(dp_accounting.GaussianDpEvent(e["noise_multiplier"]), e["count"])
        else:
            raise AssertionError(e["mechanism"])
    return accountant.get_epsilon(delta)


@pytest.fixture
def ledger(tmp_path):
    return Ledger.create(tmp_path / "ledger.json", "instruction", 3.0, DELTA)


def test_schema_and_recomputation(ledger):
    ledger.spend(
        PoissonSubsampledGaussianEvent(
            "train-generator", noise_multiplier=1.1, sampling_rate=0.02, steps=300
        )
    )
    ledger.spend(GaussianEvent("filter", noise_multiplier=8.0))
    data = json.loads(ledger.path.read_text())
    assert set(data) == {"unit", "target", "spent", "events"}
    assert data["unit"] == "instruction"
    assert data["target"] == {"epsilon": 3.0, "delta": DELTA}
    assert data["spent"]["accountant"] == "pld"
    assert data["spent"]["delta"] == DELTA
    assert data["events"][0] == {
        "stage": "train-generator",
        "mechanism": "poisson_subsampled_gaussian",
        "noise_multiplier": 1.1,
        "sampling_rate": 0.02,
        "steps": 300,
    }
    assert data["events"][1]["mechanism"] == "gaussian"
    independent = recompute_pld(data["events"], DELTA)
    assert data["spent"]["epsilon"] == pytest.approx(independent, rel=1e-3)
    # RDP cross-check: never smaller than PLD, and in the same ballpark
    assert independent <= data["spent"]["rdp_epsilon"] <= 1.5 * independent
    # reload round-trips
    again = Ledger.load(ledger.path)
    assert again.events == ledger.events
    assert again.spent_epsilon == pytest.approx(independent, rel=1e-3)


def test_overspend_refused_and_nothing_written(ledger):
    ledger.spend(GaussianEvent("filter", noise_multiplier=2.0))
    before = ledger.path.read_text()
    with pytest.raises(BudgetExceededError, match="target 3"):
        ledger.spend(
            PoissonSubsampledGaussianEvent(
                "train-generator", noise_multiplier=0.5, sampling_rate=0.1, steps=1000
            )
        )
    assert ledger.path.read_text() == before
    assert len(Ledger.load(ledger.path).events) == 1


def test_zero_noise_is_infinite_and_refused(ledger):
    with pytest.raises(BudgetExceededError):
        ledger.spend(GaussianEvent("filter", noise_multiplier=0.0))


def test_progress_replaces_same_run_and_counts_every_step(ledger):
    base = PoissonSubsampledGaussianEvent(
        "train-generator", noise_multiplier=1.0, sampling_rate=0.01, steps=0, run_id="r1"
    )
    for steps in (1, 2, 3):
        ledger.record_progress(
            PoissonSubsampledGaussianEvent(
                "train-generator",
                noise_multiplier=1.0,
                sampling_rate=0.01,
                steps=steps,
                run_id=base.run_id,
            )
        )
    loaded = Ledger.load(ledger.path)
    assert len(loaded.events) == 1 and loaded.events[0].steps == 3
    assert loaded.run_event("train-generator", "r1").steps == 3
    # a second run of the stage is a new spend, not a replacement
    ledger.record_progress(
        PoissonSubsampledGaussianEvent(
            "train-generator", noise_multiplier=1.0, sampling_rate=0.01, steps=2, run_id="r2"
        )
    )
    assert len(Ledger.load(ledger.path).events) == 2


def test_reopen_keeps_spends_and_rejects_other_target(tmp_path):
    path = tmp_path / "ledger.json"
    first = Ledger.create(path, "instruction", 3.0, DELTA)
    first.spend(GaussianEvent("filter", noise_multiplier=5.0))
    assert len(Ledger.create(path, "instruction", 3.0, DELTA).events) == 1
    with pytest.raises(BudgetExceededError, match="different target"):
        Ledger.create(path, "user", 3.0, DELTA)


def test_unknown_mechanism_rejected():
    with pytest.raises(ValueError, match="unknown mechanism 'laplace'"):
        PrivacyEvent.from_dict({"stage": "x", "mechanism": "laplace"})


def test_budget_table(ledger, capsys):
    from dpray.cli import main

    ledger.spend(GaussianEvent("filter", noise_multiplier=5.0))
    assert main(["budget", str(ledger.path.parent)]) == 0
    out = capsys.readouterr().out
    assert "filter" in out and "remaining" in out and "target" in out


def test_progress_with_planned_bound_is_an_upper_bound(ledger):
    def ev(steps):
        return PoissonSubsampledGaussianEvent(
            "train-generator", noise_multiplier=1.0, sampling_rate=0.02, steps=steps, run_id="p"
        )

    plan = ev(200)
    ledger.check(plan)
    for steps in (1, 50, 199):
        reported = ledger.record_progress(ev(steps), bound=plan)
        exact = ledger.accounting([ev(steps)]).epsilon
        assert exact - 1e-9 <= reported <= ledger.accounting([plan]).epsilon + 1e-9
    saved = json.loads(ledger.path.read_text())
    assert saved["events"][0]["steps"] == 199
    assert saved["spent"]["epsilon"] <= 3.0


# ------------------------------------------------------------------ concurrent commands (#14)
# Gaussian releases at sigma 4 compose (PLD, delta 1e-5) to 2.94 for 8 and 3.15 for 9: with a
# target of 3.05 exactly eight fit, whoever spends them.
CONCURRENT_SIGMA = 4.0
CONCURRENT_TARGET = 3.05


def _spend_many(path: str, stage: str, attempts: int, barrier, results) -> None:
    """Child process: open the ledger, wait for the other one, then spend ``attempts`` times."""
    ledger = Ledger.load(path)
    barrier.wait()
    spent = refused = 0
    for _ in range(attempts):
        try:
            ledger.spend(GaussianEvent(stage, noise_multiplier=CONCURRENT_SIGMA))
            spent += 1
        except BudgetExceededError:
            refused += 1
    results.put((stage, spent, refused))


def _concurrent_spends(path, attempts: int) -> dict[str, tuple[int, int]]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_spend_many, args=(str(path), stage, attempts, barrier, results))
        for stage in ("stage-a", "stage-b")
    ]
    for proc in procs:
        proc.start()
    outcome = {}
    for _ in procs:
        stage, spent, refused = results.get(timeout=300)
        outcome[stage] = (spent, refused)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return outcome


def test_concurrent_spends_all_land_and_compose(tmp_path):
    """Two commands spending on one run directory at once: no spend is lost (#14, defect 3)."""
    path = tmp_path / "ledger.json"
    Ledger.create(path, "instruction", CONCURRENT_TARGET, DELTA)
    outcome = _concurrent_spends(path, attempts=4)
    assert outcome == {"stage-a": (4, 0), "stage-b": (4, 0)}
    data = json.loads(path.read_text())
    assert sorted(e["stage"] for e in data["events"]) == ["stage-a"] * 4 + ["stage-b"] * 4
    assert data["spent"]["epsilon"] == pytest.approx(recompute_pld(data["events"], DELTA), 1e-3)
    assert data["spent"]["epsilon"] == pytest.approx(
        Ledger.load(path).accounting([GaussianEvent("x", noise_multiplier=4.0)] * 8).epsilon
    )


def test_concurrent_overspend_is_refused(tmp_path):
    """Each process alone could spend six; together only eight fit, and the rest are refused."""
    path = tmp_path / "ledger.json"
    Ledger.create(path, "instruction", CONCURRENT_TARGET, DELTA)
    outcome = _concurrent_spends(path, attempts=6)
    assert sum(spent for spent, _ in outcome.values()) == 8
    assert sum(refused for _, refused in outcome.values()) == 4
    data = json.loads(path.read_text())
    assert len(data["events"]) == 8
    assert data["spent"]["epsilon"] <= CONCURRENT_TARGET
    assert recompute_pld(data["events"], DELTA) <= CONCURRENT_TARGET + 1e-3


def test_stale_ledger_object_composes_with_the_file(ledger):
    """A ledger loaded before another command spent must check against what is on disk now."""
    stale = Ledger.load(ledger.path)
    for _ in range(7):
        ledger.spend(GaussianEvent("filter", noise_multiplier=4.0))
    # seven on disk: 2.73; one more fits the target of 3, a second would not
    stale.spend(GaussianEvent("other", noise_multiplier=4.0))
    assert len(Ledger.load(ledger.path).events) == 8
    with pytest.raises(BudgetExceededError):
        stale.spend(GaussianEvent("other", noise_multiplier=4.0))
    assert len(Ledger.load(ledger.path).events) == 8
    # training progress from a stale object keeps the other stages' events too
    ledger2 = Ledger.create(ledger.path.parent / "l2.json", "instruction", 3.0, DELTA)
    stale2 = Ledger.load(ledger2.path)
    ledger2.spend(GaussianEvent("filter", noise_multiplier=8.0))
    stale2.record_progress(
        PoissonSubsampledGaussianEvent(
            "train-generator", noise_multiplier=1.0, sampling_rate=0.01, steps=5, run_id="r"
        )
    )
    assert [e.stage for e in Ledger.load(ledger2.path).events] == ["filter", "train-generator"]
