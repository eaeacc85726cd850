"""Annotate: teacher responses (local tiny model, or an OpenAI-compatible server on 127.0.0.1)
and preference pairs (teacher-vs-student rule, or a reward model's ranking)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpray.config import ConfigError, config_from_tree
from dpray.rundir import RunDir
from dpray.stages import STAGES, annotate
from dpray.stages.align.generate import (
    EndpointError,
    GenerationSettings,
    chat_completions_url,
    describe,
)
from dpray.stages.align.judges import RewardJudge
from dpray.stages.align.models import new_reward_model

TINY = "tiny:"
INSTRUCTIONS = [f"Name {i} things a gardener might need in spring." for i in range(1, 7)]


class FakeOpenAI(BaseHTTPRequestHandler):
    """``/v1/chat/completions`` answering ``Echo: <user message>``; fails the first N calls."""

    seen: list[dict] = []
    fail_first = 0

    def do_POST(self):  # noqa: N802  (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_response(503)
            self.end_headers()
            return
        user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
        reply = {
            "choices": [
                {
                    "message": {"role": "assistant", "content": f"Echo: {user}"},
                    "finish_reason": "stop",
                }
            ]
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server():
    FakeOpenAI.seen = []
    FakeOpenAI.fail_first = 0
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _config(tmp_path, **annotate_section):
    return config_from_tree(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"path": "unused"},
            "privacy": {"epsilon": 1.0},
            "annotate": {"num_actors": 0, "max_new_tokens": 8, "batch_size": 4, **annotate_section},
        }
    )


def _write_filtered(config) -> RunDir:
    run_dir = RunDir(config.run_dir)
    pq.write_table(pa.table({"text": INSTRUCTIONS}), run_dir.public("filter") / "filtered.parquet")
    return run_dir


def test_endpoint_url_forms_and_safe_names():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    full = "https://h/v1/chat/completions"
    assert chat_completions_url(full) == full
    assert describe("https://user:secret@api.example:8443/v1") == "https://api.example:8443/v1"
    assert describe("packaged:smollm2") == "packaged:smollm2"


def test_annotate_with_endpoint_teacher_and_rule_judge(tmp_path, server, monkeypatch):
    monkeypatch.setenv("DPRAY_TEST_KEY", "sk-test-0123456789")
    config = _config(
        tmp_path,
        teacher=server + "/v1",
        teacher_name="teacher-model",
        api_key_env="DPRAY_TEST_KEY",
        student=TINY,
        max_retries=2,
    )
    run_dir = _write_filtered(config)
    FakeOpenAI.fail_first = 1  # one 503: retried
    result = annotate.run(config, run_dir)

    pairs = pq.read_table(run_dir.root / "annotate" / "pairs" / "train.parquet").to_pylist()
    assert [p["prompt"] for p in pairs] == INSTRUCTIONS  # one response each, in order
    assert [p["completion"] for p in pairs] == [f"Echo: {t}" for t in INSTRUCTIONS]
    assert {p["teacher"] for p in pairs} == {server + "/v1"}
    assert len(FakeOpenAI.seen) == len(INSTRUCTIONS) + 1
    assert all(s["path"] == "/v1/chat/completions" for s in FakeOpenAI.seen)
    assert all(s["auth"] == "Bearer sk-test-0123456789" for s in FakeOpenAI.seen)

    assert result.summary["skipped_too_long"] == 0
    prefs = pq.read_table(run_dir.root / "annotate" / "preferences" / "train.parquet").to_pylist()
    dropped = result.summary["preference_dropped"]
    assert len(prefs) + sum(dropped.values()) == len(INSTRUCTIONS)
    assert len(prefs) >= 1
    assert all(p["chosen"] == f"Echo: {p['prompt']}" for p in prefs)  # teacher beats student
    for path in run_dir.public_files():  # the key is never stored
        assert b"sk-test-0123456789" not in path.read_bytes()


def test_overlong_instructions_are_skipped_and_counted():
    kept, skipped = annotate.split_long(["short", "x" * 50, "also short"], max_chars=20)
    assert kept == ["short", "also short"] and skipped == 1


def test_endpoint_gives_up_without_echoing_prompts(server):
    FakeOpenAI.fail_first = 10
    from dpray.stages.align.generate import EndpointResponder, EndpointSettings

    responder = EndpointResponder(server, GenerationSettings(), EndpointSettings(max_retries=0))
    with pytest.raises(EndpointError) as err:
        responder.respond(["a secret prompt"], seed=0)
    assert "503" in str(err.value) and "secret" not in str(err.value)


def test_annotate_local_teacher_ranked_by_reward_model(tmp_path):
    judge_dir = tmp_path / "judge"
    model, tokenizer = new_reward_model(TINY)
    model.save_pretrained(judge_dir)
    tokenizer.save_pretrained(judge_dir)
    config = _config(
        tmp_path,
        teacher=TINY,
        rejected_from="teacher",
        temperature=1.0,
        judge="reward_model",
        judge_model=str(judge_dir),
    )
    run_dir = _write_filtered(config)
    result = annotate.run(config, run_dir)

    pairs = pq.read_table(run_dir.root / "annotate" / "pairs" / "train.parquet").to_pylist()
    assert len(pairs) == len(INSTRUCTIONS)
    assert result.summary["responses"] == len(INSTRUCTIONS)
    prefs = pq.read_table(run_dir.root / "annotate" / "preferences" / "train.parquet").to_pylist()
    assert prefs, "a random tiny teacher's two samples should differ"
    judge = RewardJudge(str(judge_dir))
    prompts = [p["prompt"] for p in prefs]
    chosen = judge.score(prompts, [p["chosen"] for p in prefs])
    rejected = judge.score(prompts, [p["rejected"] for p in prefs])
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))


def test_local_responses_are_deterministic_per_seed():
    from dpray.stages.align.generate import LocalResponder

    settings = GenerationSettings(temperature=1.0, max_new_tokens=6, batch_size=2)
    responder = LocalResponder(TINY, settings)
    first = responder.respond(INSTRUCTIONS, seed=3)
    again = responder.respond(INSTRUCTIONS, seed=3)
    other = responder.respond(INSTRUCTIONS, seed=4)
    assert [c.text for c in first] == [c.text for c in again]
    assert [c.text for c in first] != [c.text for c in other]
    assert len(first) == len(INSTRUCTIONS)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"judge": "rule", "rejected_from": "teacher"}, "rejected_from"),
        ({"judge": "reward_model"}, "judge_model"),
        ({"teacher_model": "x"}, "unknown key"),
        (
            {
                "rejected_from": "teacher",
                "judge": "reward_model",
                "judge_model": "j",
                "temperature": 0,
            },
            "temperature",
        ),
    ],
)
def test_annotate_config_errors(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **section)


def test_stage_is_registered_public_only():
    stage = STAGES["annotate"]
    assert "private" not in stage.reads
    assert stage.sections == ("annotate", "seed")
