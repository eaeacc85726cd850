"""The train-generator stage for real on Ray Train: 2 CPU workers, secure aggregation, real
instructions from ../shared/data, a tiny model; and a worker killed mid-run."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import dp_accounting
import pytest
import torch

from dpray.config import config_from_tree
from dpray.models import make_tiny_causal_lm
from dpray.pipeline import run_stage
from dpray.privacy.ledger import Ledger
from dpray.rundir import RunDir
from dpray.stages import STAGES
from tests.conftest import shared_data
from tests.train_helpers import dp_train_tree

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    root = Path(os.path.expanduser("~/.cache/dpray"))
    root.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="r", dir=root),
        logging_level="WARNING",
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_causal_lm(tmp_path_factory.mktemp("m") / "tiny", hidden_size=64)


@pytest.fixture(scope="module")
def real_500(tmp_path_factory):
    src = shared_data("dolly15k_rows0-6399.jsonl")
    path = tmp_path_factory.mktemp("d") / "dolly500.jsonl"
    with src.open() as fin, path.open("w") as fout:
        for _, line in zip(range(520), fin, strict=False):
            fout.write(line)
    return path


def _config(tmp_path, data, model, **train):
    return config_from_tree(
        dp_train_tree(tmp_path / "run", data, model, **{"learning_rate": 5e-3, **train})
    )


def _generate(model_dir, adapter_dir, prompt_ids, stop_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens=12,
        min_new_tokens=4,
        do_sample=True,
        eos_token_id=stop_ids,
        top_p=0.95,
        pad_token_id=tok.eos_token_id,
    )
    return tok.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def test_two_workers_secure_on_real_instructions(tmp_path, ray_local, tiny_model, real_500):
    config = _config(tmp_path, real_500, tiny_model, steps=4, num_workers=2, checkpoint_every=2)
    run_dir = RunDir(config.run_dir)
    run_stage(STAGES["ingest"], config, run_dir)
    result = run_stage(STAGES["train-generator"], config, run_dir)
    summary = result.summary
    assert summary["noise"] == "secure" and summary["num_workers"] == 2
    assert summary["units"] >= 490 and summary["executed_steps"] == 4
    ledger = json.loads(run_dir.ledger_path.read_text())
    (event,) = ledger["events"]
    assert event["mechanism"] == "poisson_subsampled_skellam"
    assert (
        event["steps"] == 4 and event["bits"] == 40 and event["min_honest_workers"] == 1
    )  # W - 1 by default
    assert ledger["spent"]["accountant"] == "rdp"
    assert ledger["spent"]["epsilon"] <= 0.9 * 4.0 + 1e-9  # within privacy.train_share
    # secure accounting is never below the Gaussian one for the same sigma, q, T
    gauss = dp_accounting.pld.PLDAccountant()
    gauss.compose(
        dp_accounting.PoissonSampledDpEvent(
            event["sampling_rate"], dp_accounting.GaussianDpEvent(event["noise_multiplier"])
        ),
        event["steps"],
    )
    assert ledger["spent"]["epsilon"] >= gauss.get_epsilon(1e-5)
    adapter = run_dir.root / "generator" / "adapter"
    assert (adapter / "adapter_config.json").exists()
    meta = json.loads((run_dir.root / "generator" / "generator.json").read_text())
    assert meta["strategy"] == "dp_finetune" and meta["format"] == "chat_user"
    assert meta["prompt_ids"] == meta["prompts"][0] and meta["adapter_sha256"]
    text = _generate(tiny_model, adapter, meta["prompt_ids"], meta["stop_ids"])
    assert isinstance(text, str) and len(text) > 0
    metrics = [json.loads(x) for x in (run_dir.root / "generator/metrics.jsonl").open()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # no loss and no step time (it tracks the realised Poisson batch): neither is DP
    assert set(metrics[0]) == {"step", "epsilon"}
    private_metrics = [json.loads(x) for x in (run_dir.private("train") / "metrics.jsonl").open()]
    assert "step_seconds" in private_metrics[0] and "loss_rank0" in private_metrics[0]
    # no private text outside private/
    texts = [json.loads(x)["instruction"] for x in real_500.open()]
    long_texts = [t for t in texts if len(t) > 40][:200]
    for path in run_dir.public_files():
        blob = path.read_bytes().decode("utf-8", "replace")
        assert not any(t in blob for t in long_texts), path


def test_central_ledger_matches_dp_accounting(tmp_path, ray_local, tiny_model, real_500, capfd):
    config = _config(tmp_path, real_500, tiny_model, steps=3, num_workers=1)
    config = config.model_copy(update={"progress": True})
    run_dir = RunDir(config.run_dir)
    run_stage(STAGES["ingest"], config, run_dir)
    run_stage(STAGES["train-generator"], config, run_dir)
    # rank 0's step bar reaches the driver through Ray's log monitor (dpray.worker_progress)
    drawn = ""
    for _ in range(50):
        drawn += capfd.readouterr().err
        if "3.00/3.00" in drawn or "3.0/3.0" in drawn:
            break
        time.sleep(0.1)
    assert "train-generator (DP-SGD) epsilon<=" in drawn, drawn[-2000:]
    # what reached the driver's console carries no step time: it tracks the realised Poisson
    # batch size (Ray Train logs every reported metric; only step and epsilon are reported)
    drawn += capfd.readouterr().out + capfd.readouterr().err
    assert "step_seconds" not in drawn and "loss_rank0" not in drawn, drawn[-2000:]
    ledger = json.loads(run_dir.ledger_path.read_text())
    (event,) = ledger["events"]
    assert event["mechanism"] == "poisson_subsampled_gaussian"
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(
        dp_accounting.PoissonSampledDpEvent(
            event["sampling_rate"], dp_accounting.GaussianDpEvent(event["noise_multiplier"])
        ),
        event["steps"],
    )
    independent = accountant.get_epsilon(ledger["target"]["delta"])
    assert ledger["spent"]["epsilon"] == pytest.approx(independent, rel=0.01)
    # sigma was calibrated for the planned steps plus restart headroom, within train_share
    planned = (
        Ledger.load(run_dir.ledger_path)
        .accounting(
            [
                type(Ledger.load(run_dir.ledger_path).events[0])(
                    "x",
                    noise_multiplier=event["noise_multiplier"],
                    sampling_rate=event["sampling_rate"],
                    steps=3 + 2 * 10,
                )
            ]
        )
        .epsilon
    )
    assert planned == pytest.approx(0.9 * 4.0, rel=0.02)


def test_worker_killed_mid_run_resumes_and_counts_every_step(
    tmp_path, ray_local, tiny_model, real_500
):
    config = _config(
        tmp_path,
        real_500,
        tiny_model,
        steps=5,
        num_workers=2,
        checkpoint_every=2,
        max_failures=1,
        fail_at_step=3,
    )
    run_dir = RunDir(config.run_dir)
    run_stage(STAGES["ingest"], config, run_dir)
    result = run_stage(STAGES["train-generator"], config, run_dir)
    assert (run_dir.private("train") / "injected_fault.done").exists()
    # steps 0,1,2 ran, the fault hit step 3, the restart resumed from the step-2 checkpoint and
    # re-ran steps 2,3,4: six noisy sums were released, and all six are in the ledger.
    assert result.summary["executed_steps"] == 6
    (event,) = Ledger.load(run_dir.ledger_path).events
    assert event.steps == 6
    metrics = [json.loads(x)["step"] for x in (run_dir.root / "generator/metrics.jsonl").open()]
    assert metrics == [1, 2, 3, 3, 4, 5]
    # The redone step samples a fresh Poisson batch (issue #14, defect 1): the ledger counts each
    # execution as its own subsampled release, true only if the restart's batch is drawn
    # independently of the lost attempt's.  Rank 0 keeps a digest of its units in the PRIVATE
    # metrics; ~16 of its ~250 units join a step, so two independent batches coincide with
    # probability below 1e-12, while reused randomness would give the same batch every time.
    private = [json.loads(x) for x in (run_dir.private("train") / "metrics.jsonl").open()]
    assert [m["step"] for m in private] == [1, 2, 3, 3, 4, 5]
    public = [json.loads(x) for x in (run_dir.root / "generator/metrics.jsonl").open()]
    assert not any("batch" in key for m in public for key in m)  # the batch stays private
    lost, redone = private[2]["batch_digest_rank0"], private[3]["batch_digest_rank0"]
    assert lost != redone, "the redone step reused the lost attempt's Poisson batch"
