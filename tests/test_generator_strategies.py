"""Generation strategies (dp_finetune, prompted, private_evolution) and prompt formats.

Fast tests: the prompt formats (what the generator is trained on and sampled from), the topic
list, the strategy defaults, and the probe two-sample test.  Slow tests: every strategy through
the CLI on the smoke config (tiny random models), the sampling stage starting from exactly the
training prompt, and private evolution's ledger (one Gaussian event per round, none on a rerun)
and its variation prompts (built from synthetic candidates only: no planted canary in any).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dpray.config import GeneratorConfig, load_config
from dpray.stages.train_generator.data import IGNORE, collate, tokenize_instructions
from dpray.stages.train_generator.formats import (
    FormatError,
    build_format,
    load_topics,
    parent_prefix,
    resolve_format,
    variation_prompt,
    variation_prompt_text,
)
from tests.conftest import REPO, make_canary
from tests.test_output_schemas import assert_one_schema_per_folder

SMOKE = REPO / "jobs" / "smoke.yaml"
TINY = "tiny:hidden=64"
END_OF_TURN = "<|im_end|>"
USER_TURN = "<|im_start|>user\n"


def tiny_tokenizer():
    """The tiny test models' tokenizer (SmolLM2's, with its chat template)."""
    from transformers import AutoTokenizer

    from dpray.models import resolve_causal_lm

    return AutoTokenizer.from_pretrained(resolve_causal_lm(TINY), local_files_only=True)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --------------------------------------------------------------------------- formats


def test_chat_user_prompt_ends_at_the_user_turn_and_stops_at_end_of_turn(tok):
    fmt = build_format("chat_user", tok)
    assert fmt.name == "chat_user" and len(fmt.prompts) == 1 and fmt.topics == []
    (text,) = fmt.prompt_texts
    assert text.endswith(USER_TURN)
    assert fmt.prompts[0] == tok.encode(text, add_special_tokens=False)
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    assert fmt.stop_ids[0] == eot == 2
    # the prompt is public and data-independent: same tokenizer, same prompt
    assert build_format("chat_user", tok).prompts == fmt.prompts


def test_training_example_is_prompt_then_text_then_stop_and_loss_is_on_text_and_stop(tok):
    fmt = build_format("chat_user", tok)
    prompt, stop = fmt.prompts[0], fmt.stop_ids[0]
    texts = ["How do I boil an egg?", "Plan a three-day trip to Lisbon for two people, please."]
    seqs = tokenize_instructions(texts, tok, 48, prompt=prompt, stop_id=stop)
    for text, seq in zip(texts, seqs, strict=True):
        assert seq.tolist() == prompt + tok.encode(text, add_special_tokens=False) + [stop]
    # a text cut at max_tokens still ends with the stop token
    (cut,) = tokenize_instructions(["word " * 200], tok, 48, prompt=prompt, stop_id=stop)
    assert len(cut) == 48 and cut[-1] == stop and cut[: len(prompt)].tolist() == prompt
    with pytest.raises(ValueError, match="no room"):
        tokenize_instructions(texts, tok, len(prompt) + 1, prompt=prompt, stop_id=stop)

    batch = collate(seqs, [0, 1], len(prompt), pad_id=0)
    for row, seq in enumerate(seqs):
        labels = batch.labels[row].tolist()
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)  # never the prompt
        assert labels[len(prompt) : len(seq)] == seq[len(prompt) :].tolist()  # text + stop
        assert labels[len(seq) :] == [IGNORE] * (len(labels) - len(seq))  # never the padding
        assert batch.input_ids[row, : len(seq)].tolist() == seq.tolist()
    assert batch.num_tokens == sum(len(s) - len(prompt) for s in seqs)


def test_chat_reply_holds_the_request_and_the_reply_is_the_instruction(tok):
    request = "Write one question a user might ask. Reply with the question only."
    fmt = build_format("chat_reply", tok, request=request)
    (text,) = fmt.prompt_texts
    assert request in text and text.endswith("<|im_start|>assistant\n")
    assert text.index(USER_TURN) < text.index(request)
    assert fmt.stop_ids[0] == tok.convert_tokens_to_ids(END_OF_TURN)
    with pytest.raises(FormatError, match="request"):
        build_format("chat_reply", tok, request="")


def test_unconditional_starts_with_bos_and_stops_at_eos(tok):
    fmt = build_format("unconditional", tok)
    assert fmt.prompts == [[tok.bos_token_id]] and fmt.stop_ids == [tok.eos_token_id]
    templated = build_format("unconditional", tok, template="Instruction:")
    assert templated.prompts[0][0] == tok.bos_token_id
    assert templated.prompts[0][1:] == tok.encode("Instruction:", add_special_tokens=False)
    assert templated.template == "Instruction:"
    with pytest.raises(FormatError, match="chat format"):
        build_format("unconditional", tok, topics=["baking"])


def test_auto_format_is_chat_user_with_a_chat_template_else_unconditional(tok):
    assert resolve_format("auto", tok) == "chat_user"
    assert resolve_format("chat_reply", tok) == "chat_reply"
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert resolve_format("auto", plain) == "unconditional"
    with pytest.raises(FormatError, match="chat template"):
        resolve_format("chat_user", plain)
    with pytest.raises(FormatError, match="unknown"):
        resolve_format("free_verse", tok)


def test_topics_give_one_prompt_per_topic_naming_it(tok):
    topics = ["baking bread", "astronomy", "tax returns"]
    for name in ("chat_user", "chat_reply"):
        fmt = build_format(name, tok, request="Write one message.", topics=topics)
        assert fmt.topics == topics and len(fmt.prompts) == len(fmt.prompt_texts) == 3
        assert len({tuple(p) for p in fmt.prompts}) == 3
        for topic, text, ids in zip(topics, fmt.prompt_texts, fmt.prompts, strict=True):
            assert topic in text and ids == tok.encode(text, add_special_tokens=False)
            assert all(other not in text for other in topics if other != topic)
        if name == "chat_user":
            assert all(t.endswith(USER_TURN) for t in fmt.prompt_texts)


def test_builtin_topics_load_without_blank_lines():
    raw = (REPO / "dpray" / "data" / "topics.txt").read_text(encoding="utf-8")
    lines = [line for line in raw.splitlines() if not line.startswith("#")]
    assert lines and all(line.strip() for line in lines), "blank line in topics.txt"
    topics = load_topics("builtin")
    assert len(topics) >= 20 and len(set(topics)) == len(topics)
    assert all(t == t.strip() and t for t in topics)
    assert load_topics(None) == load_topics("none") == []


def test_topics_from_a_public_file(tmp_path):
    path = tmp_path / "topics.txt"
    path.write_text("# my topics\ngardening\n\n  chess  \n")
    assert load_topics(str(path)) == ["gardening", "chess"]
    with pytest.raises(FormatError, match="not found"):
        load_topics(str(tmp_path / "missing.txt"))


def test_variation_prompt_names_the_synthetic_parent(tok):
    parent = "How long should I rest between sets?"
    text = variation_prompt_text("chat_user", tok, parent)
    assert parent in text and text.endswith(USER_TURN)
    reply = variation_prompt_text("chat_reply", tok, parent)
    assert parent in reply and reply.endswith("<|im_start|>assistant\n")
    with pytest.raises(FormatError, match="chat format"):
        variation_prompt_text("unconditional", tok, parent)


def test_prefix_variation_keeps_the_parents_first_words_in_the_instruction_position(tok):
    parent = "How long should I rest between sets when lifting?"
    base = build_format("chat_user", tok).prompt_texts[0]
    text, prefix = variation_prompt("chat_user", tok, parent, keep_fraction=0.5)
    assert prefix == "How long should I rest" and text == base + prefix
    assert text.endswith(USER_TURN + prefix)  # the model finishes the user's message
    reply, prefix = variation_prompt(
        "chat_reply", tok, parent, keep_fraction=0.3, request="Write one message."
    )
    assert prefix == "How long should" and reply.endswith("<|im_start|>assistant\n" + prefix)
    rewrite, none = variation_prompt("chat_user", tok, parent, method="rewrite")
    assert none == "" and parent in rewrite and rewrite.endswith(USER_TURN)
    with pytest.raises(FormatError, match="chat format"):
        variation_prompt("unconditional", tok, parent)
    with pytest.raises(FormatError, match="unknown"):
        variation_prompt("chat_user", tok, parent, method="paraphrase")


def test_parent_prefix_keeps_at_least_one_word_and_never_all():
    assert parent_prefix("one two three four", 0.5) == "one two"
    assert parent_prefix("one two three four", 0.99) == "one two three"  # the model writes more
    assert parent_prefix("one two", 0.01) == "one"
    assert parent_prefix("single", 0.5) == "single"
    assert parent_prefix("   ", 0.5) == ""
    assert parent_prefix("  Dear team,\n\nplease  send the file", 0.5) == "Dear team,\n\nplease"


def test_a_prefix_variation_draw_holds_its_prefix():
    from dpray.stages.sample.backends import GeneratorSpec

    spec = GeneratorSpec(
        base_model="m",
        base_path="/m",
        adapter_dir="",
        prompt_ids=(1,),
        template="",
        adapter_sha256="x",
        lora_r=0,
        prompts=((1, 2), (1, 3)),
        prefixes=("How do I", "Write a"),
    )
    assert [spec.prefix_for(i) for i in range(3)] == ["How do I", "Write a", "How do I"]
    assert GeneratorSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="one each"):
        GeneratorSpec(**{**spec.to_dict(), "prefixes": ("only one",)})
    plain = GeneratorSpec(**{**spec.to_dict(), "prefixes": ()})
    assert plain.prefix_for(5) == ""


def test_strategy_and_topic_defaults():
    gc = GeneratorConfig()
    assert gc.resolved_strategy(use_gpu=True) == "dp_finetune"
    assert gc.resolved_strategy(use_gpu=False) == "prompted"  # measured best on CPU
    assert GeneratorConfig(strategy="prompted").resolved_strategy(True) == "prompted"
    assert gc.resolved_topics("dp_finetune") is None
    assert gc.resolved_topics("prompted") == gc.resolved_topics("private_evolution") == "builtin"
    assert GeneratorConfig(topics="none").resolved_topics("prompted") is None


def test_smoke_config_pins_dp_finetune_and_leaves_room_for_the_chat_prompt(tok):
    """CI's smoke run stays on the paper's path, and its max_tokens fits the chat_user prompt."""
    for path in (SMOKE, REPO / "dpray" / "configs" / "smoke.yaml"):
        config = load_config(path)
        assert config.generator.resolved_strategy(config.train.use_gpu) == "dp_finetune"
        fmt = build_format(resolve_format(config.generator.format, tok), tok)
        assert fmt.name == "chat_user"
        assert config.train.max_tokens - len(fmt.prompts[0]) - 1 >= 16
    assert SMOKE.read_text() == (REPO / "dpray" / "configs" / "smoke.yaml").read_text()


def test_dp_finetune_with_topics_is_a_config_error(tok):
    from dpray.config import ConfigError
    from dpray.stages.train_generator.stage import prompt_format

    config = load_config(SMOKE, ["generator.topics=builtin"])
    with pytest.raises(ConfigError, match="topics"):
        prompt_format(config, tok, "dp_finetune")
    prompted = prompt_format(load_config(SMOKE), tok, "prompted")
    assert len(prompted.prompts) == len(load_topics("builtin"))


# --------------------------------------------------------------------------- probe


def test_probe_accuracy_is_half_for_one_distribution_and_high_for_two():
    from dpray.stages.filter.metrics import probe_accuracy

    rng = np.random.default_rng(0)
    same = probe_accuracy(rng.normal(size=(300, 16)), rng.normal(size=(300, 16)))
    assert same is not None and same < 0.65
    shifted = rng.normal(size=(300, 16))
    shifted[:, 0] += 6.0
    apart = probe_accuracy(rng.normal(size=(300, 16)), shifted)
    assert apart is not None and apart > 0.95
    assert probe_accuracy(rng.normal(size=(4, 3)), rng.normal(size=(4, 3))) is None  # too few


# --------------------------------------------------------------------------- CLI, all stages

STAGES = "ingest,train-generator,sample,embed,filter"
SMALL = [
    "sample.num_samples=40",
    "filter.target_size=20",
    "filter.num_clusters=4",
]
PE = [
    "generator.strategy=private_evolution",
    "generator.pe_rounds=2",
    "generator.pe_population=40",
    "generator.pe_variations=2",
]


@pytest.fixture(scope="module")
def ray_after_module():
    """The in-process CLI starts one local Ray and keeps it; stop it after these tests."""
    yield
    from dpray.runtime import shutdown_ray

    shutdown_ray()


def _dpray(run: Path, *overrides: str, stages: str = STAGES, force: bool = False, data=None):
    from dpray.cli import main

    argv = ["run", str(SMOKE), "--run-dir", str(run), "--stages", stages]
    for item in [*SMALL, *overrides]:
        argv += ["--set", item]
    if data is not None:
        argv += ["--set", f"data.path={data}"]
    if force:
        argv.append("--force")
    assert main(argv) == 0


def _ledger(run: Path) -> dict:
    return json.loads((run / "ledger.json").read_text())


def _check_filtered_and_within_target(run: Path) -> dict:
    filtered = pq.read_table(run / "filter" / "filtered.parquet")
    assert filtered.num_rows == 20
    ledger = _ledger(run)
    assert ledger["spent"]["epsilon"] <= ledger["target"]["epsilon"] + 1e-9
    assert [e["stage"] for e in ledger["events"]].count("filter") == 1
    metrics = json.loads((run / "private" / "filter" / "metrics.json").read_text())
    assert "probe" in metrics
    return ledger


def assert_samples_from_exactly_the_training_prompt(run: Path, tok) -> None:
    """A dp_finetune run's sampler starts from exactly the prompt the generator was trained on.

    Checked on the smoke pipeline that ``tests/test_multinode.py`` runs (dp_finetune, two secure
    workers) rather than in a run of its own here; the central mechanism's accounting is
    ``test_train_generator.test_central_ledger_matches_dp_accounting``'s.
    """
    from dpray.rundir import RunDir
    from dpray.stages.sample.backends import GeneratorSpec, prompts_digest

    meta = json.loads((run / "generator" / "generator.json").read_text())
    assert meta["strategy"] == "dp_finetune" and meta["format"] == "chat_user"
    expected = build_format("chat_user", tok)
    assert meta["prompts"] == expected.prompts and meta["prompt_ids"] == expected.prompts[0]
    assert meta["stop_ids"] == expected.stop_ids and meta["prompt_texts"] == expected.prompt_texts
    assert meta["topics"] == [] and meta["adapter_sha256"]
    assert (run / "generator" / "adapter" / "adapter_config.json").exists()
    plan = json.loads((run / "sample_draws" / "plan.json").read_text())
    assert plan["prompt_ids"] == expected.prompts[0]
    assert plan["prompts"] == prompts_digest(expected.prompts)
    assert plan["stop_ids"] == expected.stop_ids
    spec = GeneratorSpec.from_run_dir(RunDir(run))
    assert [list(p) for p in spec.prompts] == expected.prompts and spec.adapter_dir
    assert list(spec.stop_ids) == expected.stop_ids
    ledger = _ledger(run)
    (train,) = [e for e in ledger["events"] if e["stage"] == "train-generator"]
    assert train["mechanism"] == "poisson_subsampled_skellam"  # smoke: secure aggregation


@pytest.mark.slow
def test_prompted_spends_nothing_before_the_filter(tmp_path, tok, ray_after_module):
    from dpray.rundir import RunDir
    from dpray.stages.sample.backends import GeneratorSpec

    run = tmp_path / "run"
    _dpray(run, "generator.strategy=prompted")
    meta = json.loads((run / "generator" / "generator.json").read_text())
    assert meta["strategy"] == "prompted" and meta["format"] == "chat_user"
    assert meta["adapter"] is False and meta["adapter_sha256"] == ""
    assert not (run / "generator" / "adapter").exists()
    topics = load_topics("builtin")  # default topics for an untrained strategy
    assert meta["topics"] == topics
    assert meta["prompts"] == build_format("chat_user", tok, topics=topics).prompts
    spec = GeneratorSpec.from_run_dir(RunDir(run))
    assert spec.adapter_dir == "" and len(spec.prompts) == len(topics)
    ledger = _check_filtered_and_within_target(run)
    assert [e["stage"] for e in ledger["events"]] == ["filter"]  # the filter gets all of epsilon


def _private_jsonl(path: Path, canaries: list[str]) -> list[str]:
    """The smoke corpus (demo, 400 records) with canaries planted in several users' records."""
    from dpray.demo.corpus import generate_demo_records

    records = list(generate_demo_records(n=400, seed=1))
    for i, canary in enumerate(canaries):
        for j in range(3):  # each canary in three records of three different users
            record = records[37 * i + 101 * j + 5]
            record["text"] = (  # distinct texts: ingest drops duplicates
                f"My account password is {canary}, can you keep it safe? ({j + 1} of 3)"
            )
    with path.open("w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return [r["text"] for r in records]


@pytest.mark.slow
def test_private_evolution_spends_once_per_round_and_never_prompts_with_private_text(
    tmp_path, tok, ray_after_module, monkeypatch
):
    from dpray.stages.train_generator.strategies import private_evolution

    canaries = [make_canary() for _ in range(4)]
    data = tmp_path / "private.jsonl"
    private_texts = _private_jsonl(data, canaries)
    recorded: list[str] = []
    parents_seen: list[str] = []
    real = private_evolution.variation_prompts

    def recording(tokenizer, fmt_name, parents, gc):
        parents_seen.extend(parents)
        texts, ids, prefixes = real(tokenizer, fmt_name, parents, gc)
        recorded.extend(texts)
        assert len(ids) == len(texts) == len(prefixes) == len(parents)
        assert all(parent.startswith(pre) for parent, pre in zip(parents, prefixes, strict=True))
        return texts, ids, prefixes

    monkeypatch.setattr(private_evolution, "variation_prompts", recording)
    run = tmp_path / "run"
    _dpray(run, *PE, data=data)

    # one Gaussian release per round, then the filter's
    ledger = _check_filtered_and_within_target(run)
    train = [e for e in ledger["events"] if e["stage"] == "train-generator"]
    assert len(train) == 2
    assert all(e["mechanism"] == "gaussian" and e.get("count", 1) == 1 for e in train)
    assert sorted(e["run_id"].rsplit("-", 1)[1] for e in train) == ["round0", "round1"]
    assert [e["stage"] for e in ledger["events"]] == ["train-generator"] * 2 + ["filter"]

    meta = json.loads((run / "generator" / "generator.json").read_text())
    assert meta["strategy"] == "private_evolution" and meta["format"] == "chat_user"
    assert meta["adapter"] is False and meta["rounds"] == 2
    rounds = run / "generator_rounds"
    round_texts = set()
    for r in (0, 1):
        table = pq.read_table(rounds / f"round-{r}.parquet").to_pydict()
        assert set(table) >= {"text", "parent", "noisy_votes", "kept"} and any(table["kept"])
        round_texts.update(table["text"])
        assert json.loads((rounds / f"round-{r}.json").read_text())["mechanism"] == "gaussian"
    population = pq.read_table(run / "generator" / "population.parquet").column("text")
    assert 0 < len(population) <= 20  # pe_population / pe_variations
    # rounds, their draw shards and the population: one Parquet schema per folder (#15)
    folders = assert_one_schema_per_folder(run)
    assert {"generator", "generator_rounds", "generator_draws/round-0"} <= set(folders)

    # variation prompts are built from synthetic candidates only
    assert recorded and parents_seen
    assert set(parents_seen) <= round_texts
    assert set(population.to_pylist()) <= round_texts
    long_private = [t for t in private_texts if len(t) >= 40]
    for text in recorded:
        assert not any(c in text for c in canaries)
        assert not any(p in text for p in long_private)
    for path in [run / "generator" / "generator.json", run / "generator" / "population.parquet"]:
        blob = path.read_bytes().decode("utf-8", "replace")
        assert not any(c in blob for c in canaries), path
    for path in rounds.glob("*.parquet"):
        blob = " ".join(str(t) for t in pq.read_table(path).column("text").to_pylist())
        assert not any(c in blob for c in canaries), path
    # ...nor anywhere else in public files (parquet may be compressed: read its text columns)
    for path in (run / "generator").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".txt"):
            text = path.read_text(errors="replace")
            assert not any(c in text for c in canaries), path

    # a rerun with the same config reuses the saved releases: nothing new is spent
    before = _ledger(run)["events"]
    recorded.clear()
    _dpray(run, *PE, data=data, stages="train-generator", force=True)
    assert _ledger(run)["events"] == before
    again = json.loads((run / "generator" / "generator.json").read_text())
    assert all(h["reused_release"] for h in again["history"])
    assert not any(c in text for text in recorded for c in canaries)
