"""Evaluate: win rates with intervals, judges, and the stage on tiny models (aggregates only in
the public zone, even though the held-out instructions are private)."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpray.config import ConfigError, config_from_tree
from dpray.models import resolve_causal_lm
from dpray.rundir import RunDir, read_json
from dpray.stages import evaluate
from dpray.stages.align.judges import LLMJudge, parse_verdict
from dpray.stages.align.models import new_reward_model, write_meta

TINY = "tiny:"


def _config(tmp_path, **section):
    return config_from_tree(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"path": "unused"},
            "privacy": {"epsilon": 1.0},
            "evaluate": {"num_actors": 0, "max_new_tokens": 6, "base_model": TINY, **section},
        }
    )


def test_wilson_matches_the_textbook_value():
    low, high = evaluate.wilson_interval(0.5, 100, 0.95)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    low, high = evaluate.wilson_interval(1.0, 10, 0.95)
    assert high == pytest.approx(1.0) and 0.65 < low < 0.75


def test_win_rate_counts_ties_half_and_bootstrap_brackets_it(tmp_path):
    ec = _config(tmp_path).evaluate
    outcomes = [1.0] * 6 + [0.5] * 2 + [0.0] * 2
    result = evaluate.win_rate(outcomes, ec, seed=0)
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (6, 2, 2, 10)
    assert result["win_rate"] == pytest.approx(0.7)
    assert result["ci_low"] < 0.7 < result["ci_high"]
    again = evaluate.win_rate(outcomes, ec, seed=0)
    assert again == result  # seeded bootstrap
    wilson = evaluate.win_rate(outcomes, _config(tmp_path, interval="wilson").evaluate, 0)
    assert wilson["ci_low"] < 0.7 < wilson["ci_high"]
    all_wins = evaluate.bootstrap_interval(np.ones(20), 0.95, 500, 0)
    assert all_wins == (1.0, 1.0)


def test_parse_verdict():
    assert parse_verdict("Answer A is better. [[A]]") == 1.0
    assert parse_verdict("[[ b ]]") == 0.0
    assert parse_verdict("[[tie]]") == 0.5
    assert parse_verdict("no idea") == 0.5


class JudgeServer(BaseHTTPRequestHandler):
    """A judge LLM preferring the answer that says 'good'; or one always saying [[A]]."""

    always_a = False

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        answer_a = prompt.split("[Answer A]")[1].split("[Answer B]")[0]
        verdict = "[[A]]" if type(self).always_a or "good" in answer_a else "[[B]]"
        data = json.dumps({"choices": [{"message": {"content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), JudgeServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    JudgeServer.always_a = False


def test_llm_judge_asks_both_orders(judge_url):
    judge = LLMJudge(judge_url)
    prompts = ["q1", "q2", "q3"]
    a = ["a good answer", "meh", "good too"]
    b = ["meh", "a good answer", "good also"]
    assert judge.compare(prompts, a, b) == [1.0, 0.0, 0.5]
    JudgeServer.always_a = True  # pure position bias: never a win
    assert judge.compare(prompts, a, b) == [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base (tiny), an 'SFT' LoRA adapter on it, a 'PPO' full model, and a reward model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    base = resolve_causal_lm(TINY)
    torch.manual_seed(0)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    for name, param in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    peft.save_pretrained(root / "sft")
    write_meta(root / "sft", "lora", TINY)
    shutil.copytree(base, root / "ppo")
    reward, tokenizer = new_reward_model(TINY)
    reward.save_pretrained(root / "reward")
    tokenizer.save_pretrained(root / "reward")
    return root


def _place_models(run_dir: RunDir, models) -> None:
    shutil.copytree(models / "sft", run_dir.public("sft") / "model")
    shutil.copytree(models / "ppo", run_dir.public("ppo") / "model")
    (run_dir.public("reward") / "reward.json").write_text(
        json.dumps({"path": str(models / "reward")})
    )


def test_evaluate_on_private_heldout_keeps_even_aggregates_private(tmp_path, models, canary):
    config = _config(tmp_path)
    run_dir = RunDir(config.run_dir)
    _place_models(run_dir, models)
    texts = [f"How do I reset the password of account {canary}-{i}?" for i in range(5)]
    pq.write_table(pa.table({"text": texts}), run_dir.private("ingest") / "heldout.parquet")

    result = evaluate.run(config, run_dir)

    # win rates on private instructions are non-DP statistics of them: private zone only
    assert not (run_dir.root / "evaluate").exists() or not any(
        (run_dir.root / "evaluate").iterdir()
    )
    report = read_json(run_dir.private("evaluate") / "win_rates.json")
    assert set(report["comparisons"]) == {"sft_vs_base", "ppo_vs_base", "ppo_vs_sft"}
    assert report["source"] == "heldout" and report["instructions"] == 5
    for row in report["comparisons"].values():
        assert row["wins"] + row["ties"] + row["losses"] == row["n"] == 5
        assert 0.0 <= row["ci_low"] <= row["win_rate"] <= row["ci_high"] <= 1.0
    # The PPO stand-in is the base model itself: greedy answers are identical, so all ties.
    assert report["comparisons"]["ppo_vs_base"]["ties"] == 5
    assert report["public_data"] is False
    assert (run_dir.private("evaluate") / "win_rates.png").stat().st_size > 1000
    assert set(result.summary) == set(report["comparisons"])
    for path in run_dir.public_files():
        assert canary.encode() not in path.read_bytes(), path
    answers = pq.read_table(run_dir.private("evaluate") / "answers.parquet")
    assert answers.num_rows == 5 and "answer_sft" in answers.column_names


def test_evaluate_on_a_file_with_an_llm_judge_and_missing_ppo(tmp_path, models, judge_url):
    data = tmp_path / "bench.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?"}) + "\n" for i in range(3)))
    config = _config(
        tmp_path,
        data_path=str(data),
        data_public=True,
        judge="llm",
        judge_model=judge_url,
        models=["base", "sft"],
    )
    run_dir = RunDir(config.run_dir)
    shutil.copytree(models / "sft", run_dir.public("sft") / "model")
    evaluate.run(config, run_dir)
    report = read_json(run_dir.root / "evaluate" / "win_rates.json")  # declared public data
    assert report["public_data"] is True
    assert list(report["comparisons"]) == ["sft_vs_base"]
    assert report["source"] == "bench.jsonl" and report["judge"] == judge_url
    assert report["comparisons"]["sft_vs_base"]["n"] == 3


def test_evaluate_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="judge_model"):
        _config(tmp_path, judge="llm")
    with pytest.raises(ConfigError, match="models"):
        _config(tmp_path, models=["base", "dpo"])


def test_logprob_judge_is_antisymmetric_and_cancels_position_bias():
    from dpray.stages.align.judges import LogprobJudge

    judge = LogprobJudge(TINY, batch_size=2)
    questions = ["Question one?", "Question two?", "Question three?"]
    a = ["alpha beta", "the same answer", "x"]
    b = ["gamma", "the same answer", "a much longer answer than the other one"]
    ab, ba = judge.preferences(questions, a, b), judge.preferences(questions, b, a)
    assert all(abs(x + y) < 1e-4 for x, y in zip(ab, ba, strict=True))
    # identical answers: the raw margin is the judge's position bias, the average removes it
    raw = judge.margins([(questions[1], a[1], b[1])])[0]
    assert abs(raw) > 1e-6 and abs(ab[1]) < 1e-4
    assert judge.compare(questions, a, b, tie_margin=1e-3)[1] == 0.5
