"""``dpray annotate``: teacher responses for the filtered synthetic instructions, and preferences.

The synthetic instructions are DP outputs, so everything here is post-processing: any teacher may
see them (a hosted model behind an OpenAI-compatible URL included), and nothing is spent from the
privacy budget.  This stage never reads ``private/``.

* ``annotate/pairs/train.parquet``: ``prompt, completion, teacher, truncated`` -- one row per
  instruction (the SFT data, in TRL's prompt/completion columns: the synthetic instruction and
  the teacher's response, as plain strings; instructions over ``max_instruction_chars`` are
  skipped and counted).  ``teacher`` names the model or the endpoint's host, never a key.
* ``annotate/preferences/train.parquet``: ``prompt, chosen, rejected`` (TRL's preference columns)
  for the reward model.  The second response comes from the base student
  (``rejected_from: student``) or is a second teacher sample; the judge is the
  teacher-beats-student rule, or a reward model's scores (pairs it cannot separate, and pairs with
  an empty or identical response, are dropped and counted).

Each table has a folder of its own, so every folder holds one schema and
``datasets.load_dataset("parquet", data_dir=RUN_DIR / "annotate" / "pairs")`` is a dataset TRL's
trainers take as it is.

Generation goes through :mod:`dpray.stages.align.generate`: Ray Data actors with a local model
(``annotate.num_actors``; 0 generates in this process), threads against an endpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dpray.config import AnnotateConfig, DprayConfig
from dpray.rundir import RunDir, write_json
from dpray.stages.align.generate import (
    EndpointSettings,
    GenerationSettings,
    describe,
    is_endpoint,
    respond_all,
)
from dpray.stages.base import Stage, StageResult, register
from dpray.stages.sample.backends import choose_backend, derive_seed

log = logging.getLogger(__name__)
STAGE_NAME = "annotate"


PAIRS_FILE = ("pairs", "train.parquet")  # read by sft (align/sft.py names the same path)
PREFERENCES_FILE = ("preferences", "train.parquet")  # read by reward (align/reward.py)
LEGACY_FILES = ("pairs.parquet", "preferences.parquet")  # dpray 0.1: both in annotate/


def instructions_path(run_dir: RunDir) -> Path:
    return run_dir.root / "filter" / "filtered.parquet"


def write_table(table: pa.Table, folder: Path, name: tuple[str, str]) -> Path:
    """Write ``table`` as ``folder/<name>``: its own subfolder, so one schema per folder."""
    path = folder.joinpath(*name)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def load_instructions(path: Path, limit: int | None = None) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `dpray filter` first")
    texts = [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    return texts[:limit] if limit else texts


def split_long(texts: list[str], max_chars: int) -> tuple[list[str], int]:
    """``(kept, skipped)``: one very long prompt would make its whole batch pay its length."""
    kept = [t for t in texts if len(t) <= max_chars]
    return kept, len(texts) - len(kept)


def settings_of(ac: AnnotateConfig) -> GenerationSettings:
    return GenerationSettings(
        temperature=ac.temperature,
        top_p=ac.top_p,
        max_new_tokens=ac.max_new_tokens,
        batch_size=ac.batch_size,
        system_prompt=ac.system_prompt,
        vllm_batch_size=ac.vllm_batch_size,
        tensor_parallel_size=ac.tensor_parallel_size,
        max_model_len=ac.max_model_len,
        gpu_memory_utilization=ac.gpu_memory_utilization,
        deterministic=ac.deterministic,
    )


def generate(ac: AnnotateConfig, spec: str, instructions: list[str], seed: int) -> list:
    """Responses of ``spec`` (a model or an endpoint) to ``instructions``, one each, in order."""
    endpoint = EndpointSettings(
        model_name=ac.teacher_name,
        api_key_env=ac.api_key_env,
        max_concurrency=ac.max_concurrency,
        timeout=ac.request_timeout,
        max_retries=ac.max_retries,
    )
    return respond_all(
        spec,
        instructions,
        settings_of(ac),
        seed,
        backend=choose_backend(ac.backend),
        num_actors=0 if is_endpoint(spec) else ac.num_actors,
        endpoint=endpoint,
    )


def rank_pairs(
    ac: AnnotateConfig, prompts: list[str], first: list[str], second: list[str]
) -> tuple[list[dict], dict]:
    """``(rows, dropped)``: ``first`` is the teacher's response, ``second`` the other one."""
    dropped = {"empty": 0, "identical": 0, "tie": 0}
    keep = []
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if not a.strip() or not b.strip():
            dropped["empty"] += 1
        elif a.strip() == b.strip():
            dropped["identical"] += 1
        else:
            keep.append(i)
    if ac.judge == "rule":
        wins = [1.0] * len(keep)
    else:
        from dpray.stages.align.judges import RewardJudge

        judge = RewardJudge(str(ac.judge_model))
        wins = judge.compare(
            [prompts[i] for i in keep], [first[i] for i in keep], [second[i] for i in keep]
        )
    rows = []
    for i, win in zip(keep, wins, strict=True):
        if win == 0.5:
            dropped["tie"] += 1
            continue
        chosen, rejected = (first[i], second[i]) if win == 1.0 else (second[i], first[i])
        rows.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected})
    return rows, dropped


def run(config: DprayConfig, run_dir: RunDir) -> StageResult:
    ac = config.annotate
    instructions = load_instructions(instructions_path(run_dir), ac.max_instructions)
    instructions, too_long = split_long(instructions, ac.max_instruction_chars)
    if not instructions:
        raise ValueError(f"{STAGE_NAME}: no filtered instructions to annotate")
    public = run_dir.public(STAGE_NAME)
    for legacy in LEGACY_FILES:  # an older dpray's tables, side by side in one folder
        (public / legacy).unlink(missing_ok=True)
    seed = derive_seed(config.seed, STAGE_NAME, ac.seed)
    log.info("%s: %d instructions, teacher %s", STAGE_NAME, len(instructions), describe(ac.teacher))
    teacher = generate(ac, ac.teacher, instructions, derive_seed(seed, "teacher"))
    responses = [c.text for c in teacher]
    pairs = pa.table(
        {
            "prompt": pa.array(instructions, pa.string()),
            "completion": pa.array(responses, pa.string()),
            "teacher": pa.array([describe(ac.teacher)] * len(instructions), pa.string()),
            "truncated": pa.array([c.truncated for c in teacher], pa.bool_()),
        }
    )
    pairs_file = write_table(pairs, public, PAIRS_FILE)
    summary = {
        "instructions": len(instructions),
        "skipped_too_long": too_long,
        "responses": len(responses),
        "empty_responses": sum(1 for r in responses if not r.strip()),
        "truncated_responses": sum(1 for c in teacher if c.truncated),
    }
    outputs = {"pairs": str(pairs_file)}
    if ac.preferences:
        other_spec = ac.student if ac.rejected_from == "student" else ac.teacher
        other = generate(ac, other_spec, instructions, derive_seed(seed, "second"))
        rows, dropped = rank_pairs(ac, instructions, responses, [c.text for c in other])
        table = pa.Table.from_pylist(
            rows, schema=pa.schema([(k, pa.string()) for k in ("prompt", "chosen", "rejected")])
        )
        outputs["preferences"] = str(write_table(table, public, PREFERENCES_FILE))
        summary.update({"preference_pairs": len(rows), "preference_dropped": dropped})
    write_json(public / "report.json", {**summary, "teacher": describe(ac.teacher)})
    outputs["report"] = str(public / "report.json")
    log.info("%s: %s", STAGE_NAME, summary)
    return StageResult(outputs=outputs, summary=summary)


def _inputs(config: DprayConfig, run_dir: RunDir) -> list[Path]:
    paths = [instructions_path(run_dir)]
    if config.annotate.judge_model:
        paths.append(Path(config.annotate.judge_model).expanduser())
    return paths


STAGE = register(
    Stage(
        name=STAGE_NAME,
        run=run,
        help="Teacher responses and preference pairs for the filtered synthetic instructions.",
        reads="filter/filtered.parquet",
        writes="annotate/pairs/train.parquet (prompt, completion, teacher, truncated), "
        "annotate/preferences/train.parquet (prompt, chosen, rejected), annotate/report.json",
        sections=("annotate", "seed"),
        inputs=_inputs,
        needs_ray=True,
    )
)

__all__ = ["STAGE", "load_instructions", "rank_pairs", "run", "split_long"]
