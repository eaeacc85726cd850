"""dpray's GPU code paths on a real CUDA device, called directly (no Ray, no hub downloads).

What a Ray worker or actor does on its GPU, without Ray (Ray cannot travel to a lent GPU
machine): the DP-SGD step of ``train_generator.worker`` (bf16 base, fp32 LoRA, Opacus per-sample
gradients, clipping, the central and the secure noise aggregators, the update, a resume from a
checkpoint, the adapter check), the secure-aggregation transforms on CUDA tensors, HF batched
sampling, sentence-transformers embedding, TRL SFT in bf16, and SFT under DeepSpeed ZeRO-2.
Every model is a tiny random one built here, with a word-level tokenizer made here.

Marked ``gpu``: skipped without CUDA.  ``DPRAY_TEST_DEVICE=cpu`` runs the same tests on the CPU
(a dry run of the test code; fp32 everywhere).  ``scripts/gpu_tests.sh`` runs them on a lent GPU
machine; each test prints one ``[gpu]`` line of what it measured (``pytest -s``).
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.single_rank import single_rank_env

REPO = Path(__file__).resolve().parents[1]


def _test_device() -> torch.device | None:
    forced = os.environ.get("DPRAY_TEST_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda:0") if torch.cuda.is_available() else None


DEVICE = _test_device()
ON_GPU = DEVICE is not None and DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE is None, reason="needs a CUDA device (DPRAY_TEST_DEVICE=cpu: a dry run on the CPU)"
    ),
]


def report(what: str, **figures) -> None:
    """One line of what a test measured (shown with ``pytest -s``)."""
    shown = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
    )
    print(f"\n[gpu] {what}: {shown}", flush=True)


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


class Checks:
    """Soft assertions: a one-shot GPU run should report every failed check, not the first."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> bool:
        if not ok:
            self.failed.append(what)
            print(f"\n[gpu] FAILED CHECK: {what}", flush=True)
        return bool(ok)

    def done(self) -> None:
        assert not self.failed, "; ".join(self.failed)


# ------------------------------------------------------------------------- tiny models, built here

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "user assistant system the a an of to and in is it for on with as at by from this that be "
    "are was write list explain give describe how what why when which short long story poem "
    "email summary three five ideas steps about water cat dog city music history science code "
    "python data plan trip recipe cake bread book movie letter friend team work health sleep "
    "coffee tea garden rain sun moon star ocean river mountain tree flower bird fish car train "
    "bike road map computer phone game song art color red blue green small big new old good "
    "first last please help me my your our simple easy quick best"
)
WORDS = _WORDS.split()
PUNCT = list(".,?!:;'-()") + [str(d) for d in range(10)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(folder: Path):
    """A word-level fast tokenizer with a ChatML-like chat template, saved to ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIALS + PUNCT + WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def make_causal_lm(folder: Path) -> Path:
    """A tiny random Llama (fp32 safetensors) plus its tokenizer in ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def make_sentence_encoder(folder: Path) -> Path:
    """A tiny random BERT + mean pooling + normalise, saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    try:
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer

    hf_dir = folder / "hf"
    hf_dir.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(PUNCT + WORDS)]
    (hf_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(hf_dir / "vocab.txt"), model_max_length=128)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bert = BertModel(config, add_pooling_layer=False).to(torch.float32)
    bert.save_pretrained(str(hf_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(hf_dir))
    transformer = Transformer(str(hf_dir), max_seq_length=128)
    encoder = SentenceTransformer(
        modules=[transformer, Pooling(64, "mean"), Normalize()], device="cpu"
    )
    out = folder / "encoder"
    encoder.save(str(out), create_model_card=False)
    return out


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return make_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


def sentences(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[3:]) for _ in range(rng.randint(3, 40))) for _ in range(n)]


# ----------------------------------------------------------------------------------------- tests


def test_device_selection():
    """The device and precision decisions a GPU worker makes."""
    from dpray.resources import local_device
    from dpray.stages.align.common import use_bf16
    from dpray.stages.train_generator.device import base_dtype

    dtype = base_dtype(DEVICE)
    if ON_GPU:
        assert torch.cuda.is_bf16_supported()
        assert dtype == torch.bfloat16
        assert local_device("auto") == "cuda"  # outside Ray: this machine's GPU
        assert use_bf16("auto", use_gpu=True)
        report(
            "device",
            name=torch.cuda.get_device_name(0),
            capability=str(torch.cuda.get_device_capability(0)),
            torch=torch.__version__,
            cuda=torch.version.cuda,
            base_dtype=str(dtype),
        )
    else:
        assert dtype == torch.float32
        report("device", name="cpu (dry run)", torch=torch.__version__, base_dtype=str(dtype))


def test_dp_sgd_step_with_both_aggregators_on_the_device(lm_dir: Path, tmp_path: Path):
    """The worker's DP-SGD step on ``DEVICE`` (as ``train_loop_per_worker`` does it, no Ray)."""
    from dpray.stages.train_generator.adapter import build_lora_model, save_and_verify
    from dpray.stages.train_generator.device import base_dtype
    from dpray.stages.train_generator.dp_sgd import (
        apply_update,
        clipped_sum,
        per_example_loss,
        trainable_parameters,
        wrap_for_per_sample_grads,
    )
    from dpray.stages.train_generator.noise import CentralAggregator, SecureAggregator
    from dpray.stages.train_generator.plan import LoraLayout
    from dpray.stages.train_generator.worker import trainable_state
    from tests.train_helpers import batch_of, random_units

    check = Checks()
    layout = LoraLayout(0, 8, 16, 0.0, ("q_proj", "v_proj"))
    model, _ = build_lora_model(str(lm_dir), layout, DEVICE)
    model.train()
    params = trainable_parameters(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    check(params and all(p.dtype == torch.float32 for p in params), "LoRA weights not fp32")
    devices = {str(p.device) for p in model.parameters()}
    check(devices == {str(next(model.parameters()).device)}, f"model on {devices}")
    check(all(p.device.type == DEVICE.type for p in model.parameters()), f"model on {devices}")
    base_dtypes = {p.dtype for p in frozen}
    check(base_dtypes == {base_dtype(DEVICE)}, f"frozen base in {base_dtypes}")  # bf16 on a GPU
    dim = sum(p.numel() for p in params)
    frozen_before = [p.detach().clone() for p in frozen[:4]]

    clip, sigma, expected_batch = 0.5, 1.0, 16.0
    users = random_units(8, per_unit=2, seed=1)  # user-level units: two records each
    records = random_units(8, seed=2)
    batches = [batch_of(users, list(range(8))), batch_of(records, list(range(8)))]
    gsm = wrap_for_per_sample_grads(model)
    _sync()
    tick = time.perf_counter()
    local = clipped_sum(gsm, params, batches, clip)
    _sync()
    step_seconds = time.perf_counter() - tick
    vector = local.vector
    check(
        vector.device.type == DEVICE.type and vector.dtype == torch.float32,
        f"clipped sum on {vector.device} in {vector.dtype}",
    )
    check(vector.shape == (dim,) and bool(torch.isfinite(vector).all()), "clipped sum not finite")
    check(math.isfinite(local.loss_sum) and local.loss_sum > 0, f"loss sum {local.loss_sum}")
    check(local.units == 16 and local.examples == 24, f"{local.units} units {local.examples} ex")
    norm = float(vector.norm())
    check(norm <= local.units * clip * (1 + 1e-4), f"norm {norm} > units x C")

    # the padded micro-batch gives the sum of the units' one-at-a-time clipped gradients
    singles = [batch_of(users, [u]) for u in range(8)] + [batch_of(records, [u]) for u in range(8)]
    one_by_one = clipped_sum(gsm, params, singles, clip).vector
    batch_rel = float((vector - one_by_one).norm() / one_by_one.norm())
    bound = 0.1 if ON_GPU else 1e-4  # bf16 base: rounding only
    check(batch_rel < bound, f"batched vs one-by-one clipped sums differ by {batch_rel:.3g}")

    # central: rank 0 adds N(0, (sigma C)^2); one worker, no all-reduce
    central = CentralAggregator(noise_multiplier=sigma, clip_norm=clip)
    errors = []
    for step in range(16):
        noisy = central(vector, step)
        check(noisy.device == vector.device, f"central sum on {noisy.device}")
        check(noisy.dtype == torch.float32, f"central sum in {noisy.dtype}")
        errors.append((noisy - vector).double())
    central_err = torch.stack(errors)
    central_ratio = float(central_err.std() / (sigma * clip))
    central_mean = float(central_err.mean() / (sigma * clip))
    check(abs(central_ratio - 1) < 0.05, f"central noise std / (sigma C) = {central_ratio:.4f}")
    mean_bound = 5 / math.sqrt(central_err.numel())
    check(abs(central_mean) < mean_bound, f"central noise mean / (sigma C) = {central_mean:.3g}")

    # secure, one worker (no process group): the decoded sum carries Skellam noise of std sigma C
    session = os.urandom(16)
    exact = SecureAggregator(dim, 0.0, clip, max_units_per_worker=16, session=session)
    noiseless = exact(vector, 0)
    check(noiseless.device == vector.device, f"secure sum on {noiseless.device}")
    check(noiseless.dtype == torch.float32, f"secure sum in {noiseless.dtype}")
    rounding = float((noiseless - vector).abs().max())
    check(rounding < 1e-3, f"noise-free secure sum off by {rounding:.3g}")
    secure = SecureAggregator(dim, sigma, clip, max_units_per_worker=16, session=session)
    check(secure.world == 1 and secure.seeds == {}, "secure aggregator thinks it has peers")
    secure.prefetch(0)
    errors = []
    for step in range(16):
        noisy = secure(vector, step)
        check(noisy.device == vector.device, f"secure sum on {noisy.device}")
        errors.append((noisy - vector).double())
    secure_err = torch.stack(errors)
    secure_ratio = float(secure_err.std() / (sigma * clip))
    secure_mean = float(secure_err.mean() / (sigma * clip))
    check(abs(secure_ratio - 1) < 0.05, f"secure noise std / (sigma C) = {secure_ratio:.4f}")
    check(abs(secure_mean) < mean_bound, f"secure noise mean / (sigma C) = {secure_mean:.3g}")

    # the update: every LoRA tensor moves (noise reaches the zero-initialised B's partners too),
    # the frozen base does not, and the dtypes and devices stay as they were
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = [p.detach().clone() for p in params]
    apply_update(optimizer, params, noisy, expected_batch)
    moved = sum(int(not torch.equal(b, p.detach())) for b, p in zip(before, params, strict=True))
    check(moved == len(params), f"{moved} of {len(params)} LoRA tensors moved")
    check(
        all(p.dtype == torch.float32 and p.device.type == DEVICE.type for p in params),
        "LoRA weights changed dtype or device in the update",
    )
    frozen_kept = all(torch.equal(b, p) for b, p in zip(frozen_before, frozen[:4], strict=True))
    check(frozen_kept, "the update moved frozen base weights")
    batch = batches[1]
    with torch.no_grad():
        out = gsm(
            input_ids=batch.input_ids.to(DEVICE), attention_mask=batch.attention_mask.to(DEVICE)
        )
        loss_after = float(per_example_loss(out.logits, batch.labels.to(DEVICE)).mean())
    check(math.isfinite(loss_after), f"loss after the update {loss_after}")

    # resume as the worker does: CPU checkpoint -> a fresh replica on the device; same next step
    weights, opt_state = io.BytesIO(), io.BytesIO()
    torch.save(trainable_state(model), weights)
    torch.save(optimizer.state_dict(), opt_state)
    weights.seek(0)
    opt_state.seek(0)
    replica, _ = build_lora_model(str(lm_dir), layout, DEVICE)
    named = dict(replica.named_parameters())
    with torch.no_grad():
        for name, value in torch.load(weights, map_location="cpu").items():
            named[name].copy_(value)
    replica_params = trainable_parameters(replica)
    replica_opt = torch.optim.AdamW(replica_params, lr=1e-2)
    replica_opt.load_state_dict(torch.load(opt_state, map_location="cpu"))
    moments = {str(state["exp_avg"].device) for state in replica_opt.state.values()}
    check(moments == {str(params[0].device)}, f"resumed optimizer state on {moments}")
    apply_update(optimizer, params, noisy, expected_batch)
    apply_update(replica_opt, replica_params, noisy, expected_batch)
    resume_diff = max(
        float((a.detach() - b.detach()).abs().max())
        for a, b in zip(params, replica_params, strict=True)
    )
    check(resume_diff < 1e-6, f"resumed replica differs by {resume_diff:.3g}")

    gsm._close()
    changed = save_and_verify(
        model,
        trainable_state(model),
        str(lm_dir),
        tmp_path / "adapter",
        tmp_path / "adapter_check.json",
        "gpu-test",
    )
    check(changed == 4, f"{changed} changed LoRA B tensors, not 4")  # q and v in 2 layers
    report(
        "DP-SGD step",
        device=str(DEVICE),
        dim=dim,
        clipped_sum_s=step_seconds,
        batch_vs_one_by_one_rel=batch_rel,
        central_std_ratio=central_ratio,
        secure_std_ratio=secure_ratio,
        secure_rounding_max=rounding,
        scale=float(secure.cfg.scale),
        loss_after=loss_after,
        resume_max_diff=resume_diff,
    )
    check.done()


def test_secure_agg_transforms_on_the_device_match_cpu():
    """rotate/unrotate, stochastic rounding, encode and decode: CUDA tensors give the CPU's
    results (float64 rounding at most; the rounding itself is bit-identical)."""
    from dpray.privacy.secure_agg.aggregator import SecureAggConfig, decode, encode
    from dpray.privacy.secure_agg.csprng import SecureRandom
    from dpray.privacy.secure_agg.quantize import stochastic_round
    from dpray.privacy.secure_agg.rotation import rotate, unrotate

    check = Checks()
    worst = {}
    # 1000 -> 1024 (passes with after == 1 or before == 1); 2^17 + 3 -> 2^18 (batched passes)
    for dim in (1000, (1 << 17) + 3):
        gen = torch.Generator().manual_seed(dim)
        x = torch.randn(dim, generator=gen, dtype=torch.float32)
        cpu = rotate(x, seed=11, gain=3.0)
        dev = rotate(x.to(DEVICE), seed=11, gain=3.0)
        check(dev.device.type == DEVICE.type, f"rotate: result on {dev.device}")
        check(dev.dtype == torch.float64, f"rotate: result in {dev.dtype}")
        err = float((dev.cpu() - cpu).abs().max() / cpu.abs().max())
        check(err < 1e-12, f"rotate {dim}: device vs CPU rel error {err:.3g}")
        back_cpu = unrotate(cpu, seed=11, d=dim, gain=1 / 3.0, dtype=torch.float32)
        back_dev = unrotate(dev, seed=11, d=dim, gain=1 / 3.0, dtype=torch.float32)
        check(back_dev.device.type == DEVICE.type, f"unrotate: result on {back_dev.device}")
        check(back_dev.dtype == torch.float32, f"unrotate: result in {back_dev.dtype}")
        back_err = float((back_dev.cpu() - back_cpu).abs().max())
        check(back_err < 1e-6, f"unrotate {dim}: device vs CPU off by {back_err:.3g}")
        trip_err = float((back_dev.cpu() - x).abs().max())
        check(trip_err < 1e-5, f"unrotate(rotate) {dim}: off by {trip_err:.3g}")
        ints = torch.randint(-(1 << 40), 1 << 40, (cpu.shape[0],), generator=gen)
        un_cpu = unrotate(ints, seed=5, d=dim)
        un_dev = unrotate(ints.to(DEVICE), seed=5, d=dim)
        int_err = float((un_dev.cpu() - un_cpu).abs().max() / un_cpu.abs().max())
        check(int_err < 1e-12, f"unrotate int64 {dim}: rel error {int_err:.3g}")

        key = os.urandom(32)
        scaled = cpu * 1e6
        r_cpu = stochastic_round(scaled, SecureRandom.from_key(key))
        r_dev = stochastic_round(scaled.to(DEVICE), SecureRandom.from_key(key))
        check(r_dev.device.type == DEVICE.type, f"stochastic_round: result on {r_dev.device}")
        check(r_dev.dtype == torch.int64, f"stochastic_round: result in {r_dev.dtype}")
        check(torch.equal(r_dev.cpu(), r_cpu), f"stochastic_round {dim}: device != CPU")

        cfg = SecureAggConfig.create(
            dim=dim, num_workers=1, noise_multiplier=1.0, clip_norm=1.0, max_norm=10.0
        )
        x.mul_(5.0 / x.norm())
        payload_cpu = encode(x, cfg, 0, 3, {}, SecureRandom.from_key(key))
        payload_dev = encode(x.to(DEVICE), cfg, 0, 3, {}, SecureRandom.from_key(key))
        check(torch.equal(payload_dev.cpu(), payload_cpu), f"encode {dim}: device != CPU")
        dec_cpu = decode(payload_cpu, cfg)
        dec_dev = decode(payload_dev.to(DEVICE), cfg)
        check(torch.equal(dec_dev.cpu(), dec_cpu), f"decode {dim}: device != CPU")
        noise_std = float((dec_cpu - x.double()).std())  # sigma C = 1
        check(0.9 < noise_std < 1.1, f"decoded noise std {noise_std:.4f}, not 1")
        worst[dim] = max(err, int_err)
    report(
        "secure-agg transforms",
        device=str(DEVICE),
        **{f"rel_err_{d}": e for d, e in worst.items()},
    )
    check.done()


def test_hf_sampling_on_the_device(lm_dir: Path, tmp_path: Path):
    """``HFSampler``: merged LoRA generator in bf16 on the GPU, batched seeded ``generate``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.logits_process import TopPLogitsWarper

    from dpray.stages.sample.backends import GeneratorSpec, SamplingSettings
    from dpray.stages.sample.hf import HFSampler, NucleusFilter
    from dpray.stages.train_generator.data import generator_prompt_ids

    base = AutoModelForCausalLM.from_pretrained(str(lm_dir))
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(1)
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    lora.save_pretrained(str(tmp_path / "adapter"))
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    prompt = tuple(generator_prompt_ids(tokenizer, ""))
    spec = GeneratorSpec(
        base_model=str(lm_dir),
        base_path=str(lm_dir),
        adapter_dir=str(tmp_path / "adapter"),
        prompt_ids=prompt,
        template="",
        adapter_sha256="0123456789abcdef",
        lora_r=4,
    )
    settings = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=24, batch_size=16)
    check = Checks()
    sampler = HFSampler(spec, settings, device=str(DEVICE))
    weight = next(sampler.model.parameters())
    check(weight.device.type == DEVICE.type, f"sampler model on {weight.device}")
    want = torch.bfloat16 if ON_GPU else torch.float32
    check(weight.dtype == want, f"sampler model in {weight.dtype}")

    _sync()
    tick = time.perf_counter()
    first = sampler.sample(list(prompt), 40, seed=123)
    _sync()
    seconds = time.perf_counter() - tick
    assert len(first) == 40 and all(isinstance(c.text, str) for c in first)
    nonempty = sum(bool(c.text.strip()) for c in first)
    check(nonempty >= 20, f"only {nonempty} of 40 completions have text")
    again = sampler.sample(list(prompt), 40, seed=123)
    same = sum(a.text == b.text for a, b in zip(again, first, strict=True))
    check(same == 40, f"same seed reproduced {same} of 40 rows")  # seeded: reproducible
    other = sampler.sample(list(prompt), 40, seed=124)
    check([c.text for c in other] != [c.text for c in first], "another seed, the same rows")
    varied = [list(prompt) + tokenizer.encode(s, add_special_tokens=False) for s in sentences(20)]
    by_prompt = sampler.sample_prompts(varied, seed=5)  # left-padded, length buckets
    assert len(by_prompt) == 20
    repeat = sampler.sample_prompts(varied, seed=5)
    check([c.text for c in repeat] == [c.text for c in by_prompt], "prompt buckets not seeded")

    # the top-p filter's tensor logic on the device: the transformers warper's nucleus exactly
    for scale in (0.5, 3.0, 8.0):
        gen = torch.Generator().manual_seed(int(scale * 10))
        scores = (torch.randn(8, 5000, generator=gen) * scale).to(DEVICE)
        expected = TopPLogitsWarper(top_p=0.9)(None, scores.clone())
        got = NucleusFilter(0.9, candidates=(64, 512))(None, scores.clone())
        kept = torch.isinf(got) == torch.isinf(expected)
        check(bool(kept.all()), f"top-p filter at scale {scale}: {int((~kept).sum())} differ")
    tokens = sum(len(tokenizer.encode(c.text, add_special_tokens=False)) for c in first)
    report(
        "HF sampling",
        device=str(DEVICE),
        dtype=str(weight.dtype),
        rows=40,
        seconds=seconds,
        truncated=sum(c.truncated for c in first),
        approx_tokens_per_s=tokens / max(seconds, 1e-9),
        reproduced=same,
    )
    check.done()


def test_sentence_embeddings_on_the_device_match_cpu(tmp_path: Path):
    """``make_encoder(..., device, ..., "sentence-transformers")`` against the CPU's rows."""
    import numpy as np

    from dpray.resources import local_device
    from dpray.stages.embed.encode import make_encoder

    path = str(make_sentence_encoder(tmp_path))
    texts = sentences(300, seed=3)
    threads = torch.get_num_threads()
    try:
        device = local_device("auto") if ON_GPU else str(DEVICE)
        encode_dev = make_encoder(path, device, 1, "sentence-transformers")
        _sync()
        tick = time.perf_counter()
        on_dev = encode_dev(texts, 64)
        _sync()
        seconds = time.perf_counter() - tick
        on_cpu = make_encoder(path, "cpu", 1, "sentence-transformers")(texts, 64)
    finally:
        torch.set_num_threads(threads)  # the CPU encoder pins one thread
    assert on_dev.shape == on_cpu.shape == (300, 64) and on_dev.dtype == np.float32
    cosines = (on_dev * on_cpu).sum(1) / (
        np.linalg.norm(on_dev, axis=1) * np.linalg.norm(on_cpu, axis=1)
    )
    report(
        "embedding",
        device=device,
        rows=300,
        seconds=seconds,
        min_cosine_vs_cpu=float(cosines.min()),
    )
    assert np.allclose(np.linalg.norm(on_dev, axis=1), 1.0, atol=1e-3)
    assert float(cosines.min()) > 0.999, float(cosines.min())


# ---------------------------------------------------------------------------------- SFT (TRL)


def sft_plan(lm_dir: Path, tmp: Path, **section) -> dict:
    from dpray.config import config_from_tree
    from dpray.stages.align.common import base_plan

    section = {
        "model": str(lm_dir),
        "use_gpu": ON_GPU,
        "batch_size": 4,
        "max_steps": 3,
        "max_length": 64,
        "eval_examples": 4,
        "logging_steps": 1,
        "lora_r": 8,
        "lora_alpha": 16,
        "learning_rate": 1e-3,
        # on a GPU the default (on); the CPU dry run switches it on to take the same path
        "activation_checkpointing": None if ON_GPU else True,
        **section,
    }
    config = config_from_tree(
        {
            "run_dir": str(tmp / "run"),
            "data": {"path": "unused"},
            "privacy": {"epsilon": 1.0},
            "sft": section,
        }
    )
    plan = base_plan("sft", config.sft, seed=0)
    texts = sentences(32, seed=7)
    plan["model_path"] = str(lm_dir)
    plan["rows"] = [
        {"prompt": texts[i], "completion": texts[(i + 1) % len(texts)]} for i in range(len(texts))
    ]
    return plan


def checkpointing(args) -> bool:
    """Whether the trainer's arguments recompute activations (either transformers name)."""
    return bool(
        getattr(args, "activation_checkpointing", None)
        or getattr(args, "gradient_checkpointing", None)
    )


def _check_trl() -> None:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (carried wheels that do not fit this machine)
        pytest.skip(f"trl/datasets do not import here: {type(exc).__name__}: {exc}")


def test_sft_on_the_device(lm_dir: Path, tmp_path: Path):
    """TRL SFT with LoRA, bf16 and activation checkpointing on the GPU (``sft.train``)."""
    _check_trl()
    from dpray.stages.align import sft
    from dpray.stages.align.common import checkpointing_argument

    plan = sft_plan(lm_dir, tmp_path)
    tick = time.perf_counter()
    trainer, metrics, _ = sft.train(plan)
    seconds = time.perf_counter() - tick
    weights = {p.dtype for n, p in trainer.model.named_parameters() if "lora_" not in n}
    report(
        "SFT (TRL)",
        device=str(trainer.args.device),
        bf16=trainer.args.bf16,
        base_weights=",".join(sorted(str(w) for w in weights)),
        seconds=seconds,
        loss_before=metrics["loss_before"],
        loss_after=metrics["loss_after"],
        checkpointing_argument=checkpointing_argument(),
    )
    assert metrics["steps"] == 3
    losses = [metrics["loss_before"], metrics["loss_after"], *metrics["train_losses"]]
    assert len(metrics["train_losses"]) == 3 and all(math.isfinite(v) for v in losses)
    assert metrics["loss_before"] > 0
    assert trainer.args.device.type == DEVICE.type
    assert trainer.args.bf16 == ON_GPU
    assert checkpointing(trainer.args)  # the GPU default
    assert weights == {torch.bfloat16 if ON_GPU else torch.float32}
    assert all(p.device.type == DEVICE.type for p in trainer.model.parameters())


def _deepspeed_child(lm_dir: str, out_file: str) -> None:
    """Rank 0 of a one-process group (env set by the test), as a Ray Train worker would be."""
    from dpray.stages.align import sft

    out: dict = {}
    plan = sft_plan(Path(lm_dir), Path(out_file).parent, deepspeed=2)
    tick = time.perf_counter()
    trainer, metrics, _ = sft.train(plan)
    out["seconds"] = time.perf_counter() - tick
    engine = trainer.model_wrapped
    out.update(
        metrics=metrics,
        deepspeed_enabled=bool(trainer.is_deepspeed_enabled),
        engine=type(engine).__name__,
        zero_stage=int(engine.zero_optimization_stage()),
        bf16=bool(engine.bfloat16_enabled()),
        checkpointing=checkpointing(trainer.args),
        device=str(next(engine.module.parameters()).device),
    )
    Path(out_file).write_text(json.dumps(out))


def test_sft_deepspeed_zero2_on_the_device(lm_dir: Path, tmp_path: Path):
    """SFT under DeepSpeed ZeRO-2 (the shipped config), one rank, in a subprocess."""
    _check_trl()
    pytest.importorskip("deepspeed")
    out_file = tmp_path / "out.json"
    env = single_rank_env(
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"),
    )
    code = f"from tests.test_gpu import _deepspeed_child; _deepspeed_child({str(lm_dir)!r}, {str(out_file)!r})"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:], (exc.stderr or b"")[-3000:]
        pytest.fail(f"DeepSpeed SFT did not finish in 240 s: {tail}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(out_file.read_text())
    metrics = out["metrics"]
    report(
        "SFT DeepSpeed ZeRO-2",
        device=out["device"],
        bf16=out["bf16"],
        zero_stage=out["zero_stage"],
        seconds=out["seconds"],
        loss_before=metrics["loss_before"],
        loss_after=metrics["loss_after"],
    )
    assert out["deepspeed_enabled"] and out["engine"] == "DeepSpeedEngine"
    assert out["zero_stage"] == 2 and out["bf16"] == ON_GPU and out["checkpointing"]
    assert out["device"].startswith(DEVICE.type)
    assert metrics["steps"] == 3 and metrics["deepspeed_stage"] == 2
    losses = [metrics["loss_before"], metrics["loss_after"], *metrics["train_losses"]]
    assert all(math.isfinite(v) for v in losses) and metrics["loss_before"] > 0
