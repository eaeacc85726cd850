"""Tests for dpray.models.loader: offline model resolution, GGUF conversion, tiny models.

The SmolLM2 GGUF conversion (~15-20 s on 2 cores) runs once per session into a session-scoped
temporary cache, so the conversion path is exercised on every run. ``test_default_cache`` also
resolves into the machine cache ($DPRAY_CACHE_DIR or ~/.cache/dpray) so it stays warm for the
rest of the project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dpray.models import (
    DEFAULT_ENCODER,
    DEFAULT_GENERATOR,
    ModelSpecError,
    convert_gguf_cached,
    gguf_fingerprint,
    load_causal_lm,
    load_sentence_encoder,
    loader,
    make_tiny_causal_lm,
    make_tiny_sentence_encoder,
    packaged_smollm2_gguf,
    resolve_causal_lm,
    resolve_sentence_encoder,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dpray-cache")


@pytest.fixture(scope="session")
def smollm2_conversion(model_cache: Path) -> tuple[Path, float]:
    t0 = time.perf_counter()
    path = resolve_causal_lm(DEFAULT_GENERATOR, cache_dir=model_cache)
    return path, time.perf_counter() - t0


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_conversion: tuple[Path, float]) -> Path:
    return smollm2_conversion[0]


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path, model_cache: Path):
    return load_causal_lm(DEFAULT_GENERATOR, cache_dir=model_cache)


@pytest.fixture(scope="session")
def gguf_reference():
    """Model and tokenizer loaded straight from the GGUF by transformers (de-quantised)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_smollm2_gguf()
    with loader._offline_env(), loader._fast_gguf_parsing():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    return model, tok


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"), seed=0)


# --------------------------------------------------------------------------- SmolLM2


def test_packaged_gguf_is_found() -> None:
    gguf = packaged_smollm2_gguf()
    assert gguf.is_file() and gguf.suffix == ".gguf"
    assert gguf.stat().st_size > 50_000_000


def test_conversion_writes_float32_safetensors(smollm2_conversion, model_cache: Path) -> None:
    path, seconds = smollm2_conversion
    assert path.parent == model_cache / "models"
    assert path.name.startswith("smollm2-135m-instruct-q4_1-")
    assert path.name.endswith(gguf_fingerprint(packaged_smollm2_gguf()))
    assert (path / "model.safetensors").is_file()
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    marker = json.loads((path / "dpray_conversion.json").read_text())
    assert marker["dtype"] == "float32"
    # no temp dirs left behind
    assert not list(path.parent.glob(".tmp-*"))
    print(f"first conversion: {seconds:.1f} s")


def test_second_resolve_is_a_fast_cache_hit(smollm2_dir: Path, model_cache: Path) -> None:
    t0 = time.perf_counter()
    again = resolve_causal_lm(DEFAULT_GENERATOR, cache_dir=model_cache)
    elapsed = time.perf_counter() - t0
    assert again == smollm2_dir
    assert elapsed < 0.5, elapsed
    # the GGUF path itself maps to the same cache entry
    assert resolve_causal_lm(str(packaged_smollm2_gguf()), cache_dir=model_cache) == smollm2_dir


def test_cache_dir_env_var(smollm2_dir: Path, model_cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("DPRAY_CACHE_DIR", str(model_cache))
    assert resolve_causal_lm() == smollm2_dir


def test_converted_weights_equal_gguf_weights(smollm2, gguf_reference) -> None:
    model, _ = smollm2
    ref_model, _ = gguf_reference
    ours, ref = model.state_dict(), ref_model.state_dict()
    assert set(ours) == set(ref)
    for name in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0)
    # tied embeddings survive the round trip
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_keeps_chat_template_and_special_tokens(smollm2, gguf_reference) -> None:
    _, tok = smollm2
    _, ref_tok = gguf_reference
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    assert tok.bos_token == "<|im_start|>"
    assert tok.pad_token is not None
    assert len(tok) == len(ref_tok) == 49152
    text = "Differential privacy, naïvely: ε = 1.0 — café 🚀"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")


def test_smollm2_generates_on_cpu(smollm2) -> None:
    model, tok = smollm2
    assert next(model.parameters()).device.type == "cpu"
    inputs = tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert "Paris" in answer


def test_load_with_bfloat16(smollm2_dir: Path) -> None:
    model, tok = load_causal_lm(str(smollm2_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.pad_token_id is not None


def test_default_cache(smollm2_dir: Path) -> None:
    """Resolve into the machine cache (warms it for everyone else; ms when already warm)."""
    path = resolve_causal_lm()
    assert path.parent == loader.default_cache_dir() / "models"
    assert path.name == smollm2_dir.name
    assert (path / "model.safetensors").is_file()


# --------------------------------------------------------------------------- cache mechanics


def _fake_gguf(tmp_path: Path, content: bytes = b"GGUF" + b"x" * 4096) -> Path:
    path = tmp_path / "Fake-Model.Q8_0.gguf"
    path.write_bytes(content)
    return path


def test_fingerprint_tracks_content_and_mtime(tmp_path: Path) -> None:
    gguf = _fake_gguf(tmp_path)
    fp = gguf_fingerprint(gguf)
    assert len(fp) == 12 and fp == gguf_fingerprint(gguf)
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_fingerprint(gguf) != fp


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    def boom(src: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion exploded")

    monkeypatch.setattr(loader, "_convert_gguf", boom)
    with pytest.raises(RuntimeError, match="exploded"):
        convert_gguf_cached(_fake_gguf(tmp_path), cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [
        ".fake-model-q8_0-" + gguf_fingerprint(tmp_path / "Fake-Model.Q8_0.gguf") + ".lock"
    ]


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import dpray.models.loader as L

    def fake(src, out):
        with open(sys.argv[3], "a") as fh:
            fh.write("converted\\n")
        time.sleep(1.0)
        for name in ("config.json", "tokenizer_config.json", "model.safetensors",
                     "dpray_conversion.json"):
            (out / name).write_text("{}")

    L._convert_gguf = fake
    print(L.convert_gguf_cached(sys.argv[1], cache_dir=sys.argv[2]))
    """
)


def test_concurrent_processes_convert_once(tmp_path: Path) -> None:
    gguf = _fake_gguf(tmp_path)
    cache, log = tmp_path / "cache", tmp_path / "conversions.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(gguf), str(cache), str(log)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    assert log.read_text().count("converted") == 1
    assert not list((cache / "models").glob(".tmp-*"))


# --------------------------------------------------------------------------- specs


def test_local_hf_dir_is_returned_as_is(tiny_lm_dir: Path) -> None:
    assert resolve_causal_lm(str(tiny_lm_dir)) == tiny_lm_dir


def test_bad_specs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="packaged:smollm2"):
        resolve_causal_lm("packaged:gpt-5")
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_causal_lm(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSpecError, match="neither a Hugging Face model directory"):
        resolve_causal_lm(str(tmp_path))
    with pytest.raises(ModelSpecError) as info:
        resolve_causal_lm("HuggingFaceTB/SmolLM2-1.7B-Instruct")
    msg = str(info.value)
    assert "hub" in msg and "unreachable" in msg and "packaged:smollm2" in msg and ".gguf" in msg
    with pytest.raises(ModelSpecError, match="packaged:all-minilm-l6-v2"):
        resolve_sentence_encoder("packaged:bge-large")
    with pytest.raises(ModelSpecError, match="unreachable"):
        resolve_sentence_encoder("sentence-transformers/all-mpnet-base-v2")
    with pytest.raises(ModelSpecError):
        load_sentence_encoder(str(tmp_path / "nope"))
    assert issubclass(ModelSpecError, ValueError)


# --------------------------------------------------------------------------- tiny models


def test_tiny_causal_lm_generates(tiny_lm_dir: Path) -> None:
    model, tok = load_causal_lm(str(tiny_lm_dir))
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    text = "hello private world"
    assert tok.decode(tok(text)["input_ids"]) == text
    inputs = tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5 or out[0, -1] == tok.eos_token_id


def test_tiny_causal_lm_is_deterministic(tiny_lm_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    same = make_tiny_causal_lm(tmp_path / "same", seed=0)
    other = make_tiny_causal_lm(tmp_path / "other", seed=1)
    a = load_file(tiny_lm_dir / "model.safetensors")
    b = load_file(same / "model.safetensors")
    c = load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_tiny_sentence_encoder(tmp_path: Path) -> None:
    path = make_tiny_sentence_encoder(tmp_path / "enc", hidden_size=32)
    enc = load_sentence_encoder(str(path))
    emb = enc.encode(["a first sentence", "and a second one"])
    assert emb.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


# --------------------------------------------------------------------------- MiniLM


def test_packaged_sentence_encoder() -> None:
    assert Path(resolve_sentence_encoder(DEFAULT_ENCODER)).is_dir()
    enc = load_sentence_encoder()
    emb = enc.encode(
        ["A cat sits on the mat.", "A kitten is resting on a rug.", "Bond yields rose sharply."]
    )
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2
    two = enc.encode(["one", "two"])
    assert two.shape == (2, 384)


def test_tiny_spec_is_cached(tmp_path):
    from dpray.models import ModelSpecError, resolve_causal_lm

    first = resolve_causal_lm("tiny:hidden=32,seed=1", cache_dir=tmp_path)
    assert (first / "config.json").exists()
    assert resolve_causal_lm("tiny:hidden=32,seed=1", cache_dir=tmp_path) == first
    with pytest.raises(ModelSpecError, match="bad tiny model option"):
        resolve_causal_lm("tiny:width=3", cache_dir=tmp_path)


def test_existing_model_dir_has_no_side_effects(tmp_path):
    """What the leak scan indexes as public inputs: the resolved folder, only if already there."""
    from dpray.models import existing_model_dir, resolve_causal_lm

    assert existing_model_dir("tiny:hidden=32,seed=2", cache_dir=tmp_path) is None
    assert not (tmp_path / "models").exists()  # nothing was built
    built = resolve_causal_lm("tiny:hidden=32,seed=2", cache_dir=tmp_path)
    assert existing_model_dir("tiny:hidden=32,seed=2", cache_dir=tmp_path) == built
    assert existing_model_dir(str(built)) == built
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    assert existing_model_dir(str(gguf), cache_dir=tmp_path) is None  # not converted: None
    for spec in ("https://api.example.com/v1", "packaged:nope", str(tmp_path / "missing"), None):
        assert existing_model_dir(spec, cache_dir=tmp_path) is None
