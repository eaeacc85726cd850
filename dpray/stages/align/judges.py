"""Pairwise judges: which of two responses to an instruction is better.

``compare`` returns, per instruction, 1.0 when the first response wins, 0.0 when the second
wins and 0.5 for a tie, which is what a win rate with ties counted half averages.

* :class:`RewardJudge` scores each response with a one-logit reward model, formatted exactly as
  TRL's ``RewardTrainer`` formats a conversational example (prompt turn + assistant turn through
  the chat template), so a reward model trained by ``dpray reward`` is read the way it learned.
* :class:`LLMJudge` asks a judge LLM (local or endpoint) for a verdict in both orders and keeps
  it only when the two agree: LLM judges are known to favour whichever answer comes first.
* :class:`LogprobJudge` reads a local judge LLM's next-token log-probabilities of ``A`` and
  ``B`` in both orders and averages the two margins, which cancels a constant position bias
  instead of discarding every verdict it touches.  A small judge that always answers "A" gives
  nothing but ties under :class:`LLMJudge` (measured: SmolLM2-135M, 80 of 80 MT-bench pairs);
  its residual preference survives here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from dpray.stages.align.generate import (
    EndpointSettings,
    GenerationSettings,
    respond_all,
)
from dpray.stages.align.models import chat_messages, load_reward_model
from dpray.stages.sample.hf import left_pad


class RewardJudge:
    """Scores with a reward model directory (``AutoModelForSequenceClassification``, 1 label)."""

    def __init__(self, path: str, batch_size: int = 8, max_length: int = 1024) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer = load_reward_model(path, device=device)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length

    def encode(self, prompt: str, response: str) -> list[int]:
        messages = [*chat_messages(prompt), {"role": "assistant", "content": response}]
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        return [int(t) for t in ids][-self.max_length :]

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        encoded = [self.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
        pad = int(self.tokenizer.pad_token_id)
        scores: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            batch = encoded[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):  # right padding: the score is read at the end
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
            scores.extend(logits.logits[:, 0].float().cpu().tolist())
        return scores

    def compare(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], tie_margin: float = 0.0
    ) -> list[float]:
        score_a, score_b = self.score(prompts, a), self.score(prompts, b)
        return [
            0.5 if abs(x - y) <= tie_margin else float(x > y)
            for x, y in zip(score_a, score_b, strict=True)
        ]


JUDGE_TEMPLATE = """You are judging two answers to the same user question.

[Question]
{question}

[Answer A]
{a}

[Answer B]
{b}

Which answer is more helpful, correct and clear?
Reply with exactly one of: [[A]], [[B]], [[tie]]."""

_VERDICT = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)


def parse_verdict(text: str) -> float:
    """1.0 for A, 0.0 for B, 0.5 for a tie or an answer without a verdict."""
    found = _VERDICT.findall(text)
    if not found:
        return 0.5
    verdict = found[-1].lower()
    return {"a": 1.0, "b": 0.0}.get(verdict, 0.5)


class LLMJudge:
    """Pairwise verdicts from a judge LLM (a causal LM spec or an OpenAI-compatible URL)."""

    def __init__(
        self,
        spec: str,
        settings: GenerationSettings | None = None,
        endpoint: EndpointSettings | None = None,
        backend: str = "hf",
    ) -> None:
        self.spec = spec
        self.settings = settings or GenerationSettings(temperature=0.0, max_new_tokens=16)
        self.endpoint = endpoint
        self.backend = backend

    def compare(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], seed: int = 0
    ) -> list[float]:
        triples = list(zip(prompts, a, b, strict=True))
        forward = [JUDGE_TEMPLATE.format(question=q, a=x, b=y) for q, x, y in triples]
        swapped = [JUDGE_TEMPLATE.format(question=q, a=y, b=x) for q, x, y in triples]
        replies = respond_all(
            self.spec,
            forward + swapped,
            self.settings,
            seed,
            backend=self.backend,
            endpoint=self.endpoint,
        )
        n = len(prompts)
        first = [parse_verdict(r.text) for r in replies[:n]]
        second = [1.0 - parse_verdict(r.text) for r in replies[n:]]
        return [x if x == y else 0.5 for x, y in zip(first, second, strict=True)]


class LogprobJudge:
    """Position-debiased pairwise preference from a local judge LLM's verdict-token logits.

    For each pair the judge sees :data:`JUDGE_TEMPLATE` as a user turn and its answer is opened
    with ``[[``; the margin ``log p(A) - log p(B)`` of the next token is read with the pair in
    both orders, and ``(margin(x, y) - margin(y, x)) / 2`` is the preference for ``x``.  A
    judge biased towards one position by a constant shifts both margins alike, so the bias
    cancels.  ``tie_margin`` (in nats) turns small preferences into ties.
    """

    def __init__(self, spec: str, batch_size: int = 8, max_length: int = 2048) -> None:
        from dpray.stages.align.models import load_causal_lm

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.model, self.tokenizer = load_causal_lm(spec, dtype=dtype, device=device)
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.verdict_ids = [self._first_token(letter) for letter in ("A", "B")]
        if self.verdict_ids[0] == self.verdict_ids[1]:
            raise ValueError("the judge's tokenizer gives A and B the same first token")

    def _first_token(self, text: str) -> int:
        return int(self.tokenizer.encode(text, add_special_tokens=False)[0])

    def encode(self, question: str, a: str, b: str) -> list[int]:
        from dpray.stages.align.models import chat_prompt_ids

        prompt = JUDGE_TEMPLATE.format(question=question, a=a, b=b)
        ids = chat_prompt_ids(self.tokenizer, prompt)
        ids += self.tokenizer.encode("[[", add_special_tokens=False)
        return ids[-self.max_length :]

    @torch.inference_mode()
    def margins(self, triples: Sequence[tuple[str, str, str]]) -> list[float]:
        """``log p(A) - log p(B)`` after ``[[`` for each (question, a, b)."""
        encoded = [self.encode(*t) for t in triples]
        pad = self.tokenizer.pad_token_id
        pad = int(pad if pad is not None else self.tokenizer.eos_token_id)
        out: list[float] = []
        for start in range(0, len(encoded), self.batch_size):
            # left padding: the verdict is the next token after every row's last one
            ids, mask = left_pad(encoded[start : start + self.batch_size], pad)
            positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # padding must not shift them
            logits = self.model(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
            ).logits[:, -1, :]
            logp = logits.float().log_softmax(dim=-1)[:, self.verdict_ids]
            out.extend((logp[:, 0] - logp[:, 1]).cpu().tolist())
        return out

    def preferences(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
    ) -> list[float]:
        """Debiased preference for ``a`` over ``b`` per prompt (nats; > 0 favours ``a``)."""
        forward = self.margins(list(zip(prompts, a, b, strict=True)))
        swapped = self.margins(list(zip(prompts, b, a, strict=True)))
        return [(f - s) / 2 for f, s in zip(forward, swapped, strict=True)]

    def compare(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], tie_margin: float = 0.0
    ) -> list[float]:
        return [
            0.5 if abs(p) <= tie_margin else float(p > 0) for p in self.preferences(prompts, a, b)
        ]


__all__ = ["JUDGE_TEMPLATE", "LLMJudge", "LogprobJudge", "RewardJudge", "parse_verdict"]
