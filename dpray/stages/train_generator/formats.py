"""How a generator is asked for an instruction: the prompt every draw starts from, and its stop.

The prompt is fixed, public and data-independent (it never depends on a private record), and the
sampling stage starts from exactly the prompt the generator was trained on.  Three formats:

* ``unconditional`` -- the seed paper's: BOS (or EOS) plus ``train.template``, then the
  instruction, then EOS.  For a *base* model, whose pre-training is plain text.
* ``chat_user`` -- the model's own chat template, rendered up to the start of a user turn (its
  system message, optionally naming a public topic); the instruction is the user's message and
  generation stops at the template's end-of-turn token.  A chat-tuned model has read millions
  of user turns in exactly this position, so even untuned it writes requests that read like
  a person's (measured on SmolLM2-135M-Instruct, 2 cores: 12 of 12 draws were plain
  requests and 11 ended with end-of-turn within 48 tokens; from a bare BOS -- the old default --
  draws were web text, code and lists).
* ``chat_reply`` -- the chat template with a fixed user *request* ("Write one message that a
  user might send to an AI assistant."), the instruction as the assistant's reply.  Small chat
  models answer such a meta-request badly (they greet, offer help, or write an answer rather
  than a question), so it is offered for larger models and for comparison, not chosen by auto.

``auto`` picks ``chat_user`` when the tokenizer has a chat template, else ``unconditional``.
The loss covers the instruction and its stop token only (never the prompt).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from importlib import resources

FORMATS = ("unconditional", "chat_user", "chat_reply")

DEFAULT_SYSTEM = "You are a helpful AI assistant."
"""System message for topic prompts when the model's template has no default of its own."""

_MARK = "\u2063DPRAY\u2063MARK\u2063"
"""A string no instruction contains: rendered in place of the content, then split on."""


class FormatError(ValueError):
    """A format that cannot work with this tokenizer (no chat template, prompt too long...)."""


@dataclass(frozen=True)
class PromptFormat:
    """The public recipe of a generator's prompts (written to ``generator/generator.json``).

    ``prompts``: token ids of every prompt a draw may start from (one, or one per topic);
    ``stop_ids``: tokens that end an instruction; ``prompt_texts``: the same prompts as text,
    for people reading the metadata.  Everything here is public and data-independent.
    """

    name: str
    prompts: list[list[int]]
    stop_ids: list[int]
    prompt_texts: list[str] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)
    template: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_format(requested: str, tokenizer) -> str:
    """``auto`` -> ``chat_user`` for chat-tuned tokenizers, else ``unconditional``."""
    if requested == "auto":
        return "chat_user" if has_chat_template(tokenizer) else "unconditional"
    if requested not in FORMATS:
        raise FormatError(f"generator.format: unknown format {requested!r}; known: {FORMATS}")
    if requested.startswith("chat") and not has_chat_template(tokenizer):
        raise FormatError(
            f"generator.format {requested!r} needs a tokenizer with a chat template; this model "
            "has none (use 'unconditional' or 'auto')"
        )
    return requested


def load_topics(spec: str | None) -> list[str]:
    """Public topics: ``None``/``none`` -> [], ``builtin`` -> the packaged list, else a file.

    The packaged list (``dpray/data/topics.txt``) was written for this project and depends on no
    private data; a file given here must be public too (it is copied into public metadata).
    """
    if spec in (None, "", "none"):
        return []
    if spec == "builtin":
        text = (resources.files("dpray") / "data" / "topics.txt").read_text(encoding="utf-8")
    else:
        from pathlib import Path

        path = Path(spec)
        if not path.is_file():
            raise FormatError(f"generator.topics: file not found: {path}")
        text = path.read_text(encoding="utf-8")
    topics = [line.strip() for line in text.splitlines()]
    return [t for t in topics if t and not t.startswith("#")]


def _split_render(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """Render ``messages`` (one content is the marker) and return (text before, text after)."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    if rendered.count(_MARK) != 1:
        raise FormatError("the chat template does not render message contents verbatim")
    before, after = rendered.split(_MARK)
    return before, after


def _stop_ids(tokenizer, after: str) -> list[int]:
    """The end-of-turn token that follows a message in the template (plus EOS)."""
    stops: list[int] = []
    tail = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {}}
    if tail and (tail[0] in special or tail[0] in added):
        stops.append(int(tail[0]))
    if tokenizer.eos_token_id is not None and int(tokenizer.eos_token_id) not in stops:
        stops.append(int(tokenizer.eos_token_id))
    if not stops:
        raise FormatError("the tokenizer has neither an end-of-turn nor an EOS token")
    return stops


def _encode(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]


def unconditional_prompt_ids(tokenizer, template: str = "") -> list[int]:
    """BOS (or EOS when there is no BOS) plus the template: the seed paper's prompt."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [int(start)] if start is not None else []
    if template:
        ids += _encode(tokenizer, template)
    if not ids:
        raise FormatError("tokenizer has neither BOS nor EOS and template is empty")
    return ids


def _chat_user_messages(system: str | None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": _MARK}]


def _template_default_system(tokenizer) -> str | None:
    """The system message the template inserts when given none (SmolLM2 has one), if any."""
    before, _ = _split_render(tokenizer, [{"role": "user", "content": _MARK}])
    probe = "\u2063SYS\u2063"
    with_system, _ = _split_render(
        tokenizer, [{"role": "system", "content": probe}, {"role": "user", "content": _MARK}]
    )
    head, _, tail = with_system.partition(probe)
    if before.startswith(head) and before.endswith(tail) and len(before) > len(head) + len(tail):
        return before[len(head) : len(before) - len(tail)]
    return None


def topic_system(tokenizer, topic: str, system: str | None) -> str:
    """The system message that names a topic: the configured or default one plus a sentence."""
    base = system or _template_default_system(tokenizer) or DEFAULT_SYSTEM
    base = base.rstrip()
    if base and not base.endswith((".", "!", "?")):
        base += "."
    return f"{base} The user asks about {topic}."


def build_format(
    name: str,
    tokenizer,
    *,
    template: str = "",
    request: str = "",
    system: str | None = None,
    topics: list[str] | None = None,
) -> PromptFormat:
    """The prompts and stop tokens of format ``name`` (already resolved, not ``auto``)."""
    topics = list(topics or [])
    if name == "unconditional":
        if topics:
            raise FormatError("generator.topics needs a chat format (the prompt names the topic)")
        ids = unconditional_prompt_ids(tokenizer, template)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise FormatError("the tokenizer has no EOS token")
        return PromptFormat(name, [ids], [int(eos)], [tokenizer.decode(ids)], [], template)
    if name == "chat_user":
        systems = [topic_system(tokenizer, t, system) for t in topics] if topics else [system]
        texts, stops = [], None
        for sys_text in systems:
            before, after = _split_render(tokenizer, _chat_user_messages(sys_text))
            texts.append(before)
            stops = stops or _stop_ids(tokenizer, after)
        return PromptFormat(name, [_encode(tokenizer, t) for t in texts], stops, texts, topics)
    if name == "chat_reply":
        if not request:
            raise FormatError("generator.request is empty")
        requests = [f"{request.rstrip('.')} about {t}." for t in topics] if topics else [request]
        texts, stops = [], None
        for req in requests:
            messages = [{"role": "system", "content": system}] if system else []
            messages += [
                {"role": "user", "content": req},
                {"role": "assistant", "content": _MARK},
            ]
            before, after = _split_render(tokenizer, messages)
            texts.append(before)
            stops = stops or _stop_ids(tokenizer, after)
        return PromptFormat(name, [_encode(tokenizer, t) for t in texts], stops, texts, topics)
    raise FormatError(f"unknown generator format {name!r}; known: {FORMATS}")


VARIATION_SYSTEM = 'The user\'s message is similar in subject and style to this one: "{parent}"'
"""chat_user variations: appended to the system message (the parent is a synthetic text)."""

VARIATION_REQUEST = (
    'Here is a message someone sent to an AI assistant: "{parent}" Write a different message '
    "that another person might send, on a similar subject. Reply with the message only."
)
"""chat_reply variations: the request (the parent is a synthetic text)."""


def variation_prompt_text(name: str, tokenizer, parent: str, system: str | None = None) -> str:
    """The prompt asking for a variation of ``parent`` -- a SYNTHETIC candidate, never a
    private record (Private Evolution's variation step is post-processing of DP outputs)."""
    if name == "chat_user":
        base = (system or _template_default_system(tokenizer) or DEFAULT_SYSTEM).rstrip()
        if base and not base.endswith((".", "!", "?")):
            base += "."
        sys_text = f"{base} {VARIATION_SYSTEM.format(parent=parent)}"
        before, _ = _split_render(tokenizer, _chat_user_messages(sys_text))
        return before
    if name == "chat_reply":
        messages = [{"role": "system", "content": system}] if system else []
        messages += [
            {"role": "user", "content": VARIATION_REQUEST.format(parent=parent)},
            {"role": "assistant", "content": _MARK},
        ]
        before, _ = _split_render(tokenizer, messages)
        return before
    raise FormatError(
        f"private_evolution needs a chat format (chat_user or chat_reply), not {name!r}: its "
        "variation step asks the model for a message like a given one"
    )


VARIATIONS = ("prefix", "rewrite")
"""How private evolution asks for a variation of a kept (synthetic) candidate:

* ``prefix`` -- keep the first words of the parent at the start of the instruction and let the
  model write the rest in the generator's own format (a causal LM's form of Aug-PE's
  fill-in-the-blanks variation; ``generator.pe_keep_fraction`` of the words are kept).  The
  child stays on the parent's subject and in its register, and it is written in exactly the
  position the model writes instructions in.  Measured on SmolLM2-135M-Instruct (24 parents,
  48 new tokens): 23 of 24 ended at the end-of-turn token and read as user requests;
* ``rewrite`` -- ask in words for a message "similar in subject and style" to the parent (the
  system message for ``chat_user``, the request for ``chat_reply``).  On the same 24 parents only
  12 of 24 ended within 48 tokens, and many drifted off subject or answered instead of asking:
  a 135M model follows such meta-instructions poorly.  Offered for larger models.
"""


def parent_prefix(parent: str, keep_fraction: float) -> str:
    """The first ``ceil(keep_fraction * words)`` words of ``parent``: at least one, and fewer
    than all of them when it has more than one (so the model always writes something)."""
    words = [m.end() for m in re.finditer(r"\S+", parent)]
    if not words:
        return ""
    keep = math.ceil(len(words) * keep_fraction)
    keep = max(1, min(keep, len(words) - 1)) if len(words) > 1 else 1
    return parent[: words[keep - 1]].lstrip()  # the parent's own text, whitespace and all


def variation_prompt(
    name: str,
    tokenizer,
    parent: str,
    *,
    method: str = "prefix",
    keep_fraction: float = 0.5,
    system: str | None = None,
    request: str = "",
) -> tuple[str, str]:
    """``(prompt text, text prefix)`` of a variation of ``parent`` (a SYNTHETIC candidate).

    With ``prefix`` the prompt is the format's own (topic-free) prompt followed by the kept
    words, and the draw's text is the prefix plus what the model writes; with ``rewrite`` the
    prefix is empty (see :data:`VARIATIONS`).
    """
    if method == "rewrite":
        return variation_prompt_text(name, tokenizer, parent, system), ""
    if method != "prefix":
        raise FormatError(f"generator.pe_variation: unknown {method!r}; known: {VARIATIONS}")
    if name not in ("chat_user", "chat_reply"):
        raise FormatError(
            f"private_evolution needs a chat format (chat_user or chat_reply), not {name!r}"
        )
    base = build_format(name, tokenizer, system=system, request=request).prompt_texts[0]
    prefix = parent_prefix(parent, keep_fraction)
    return base + prefix, prefix


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt (as :func:`build_format` encodes them)."""
    return _encode(tokenizer, text)


__all__ = [
    "FORMATS",
    "VARIATIONS",
    "VARIATION_REQUEST",
    "VARIATION_SYSTEM",
    "encode_prompt",
    "variation_prompt_text",
    "FormatError",
    "PromptFormat",
    "build_format",
    "load_topics",
    "parent_prefix",
    "variation_prompt",
    "resolve_format",
    "unconditional_prompt_ids",
]
