"""Demo corpus generator: a synthetic stand-in for a provider's private chat logs.

Why: ``dpray demo`` must run offline, with no download and no real user data, yet the
pipeline (user-level DP, PII scrubbing, topic clustering, contribution bounding) only makes
sense on data that looks like real chat logs. This module composes a few thousand varied user
instructions from hand-written templates across ~40 everyday and technical topics, with
a skewed (Zipf-like) user distribution, per-user topic preferences and writing styles, and
a controlled share (~20%) of records carrying clearly *fake* personal details (names,
``example.*`` / ``mail.test`` emails, ``555-01xx`` phone numbers, ``TEST`` IBANs, street
addresses in made-up towns, dates of birth, medications and conditions).

The templates and word lists are data, not code: ``data/vocabulary.yaml`` (identity material,
shared slots, styling phrases) and ``data/topics.yaml`` (per-topic templates), shipped as
package data. This module only draws from them.

Everything is generated from a fixed seed with a local ``random.Random`` (never global
state), so the same ``(n, seed, num_users)`` always yields the same corpus, byte for byte
(tests/test_demo_corpus.py pins a digest). All template text was written for this project;
nothing is copied from any dataset.
"""

from __future__ import annotations

import json
import pathlib
import random
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import yaml

__all__ = [
    "PII_SHARE",
    "TOPICS",
    "generate_demo_records",
    "generate_tagged_records",
    "write_demo_jsonl",
]

#: Exact fraction of records that carry fake personal details.
PII_SHARE = 0.2
_MAX_WORDS = 115

SlotValue = Sequence[str] | Callable[["_Filler"], str]


def _load(name: str) -> dict[str, Any]:
    """One of the package's data files (works from a source tree and an installed wheel)."""
    text = (resources.files("dpray.demo") / "data" / name).read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _int(lo: int, hi: int) -> Callable[[_Filler], str]:
    return lambda f: str(f.rng.randint(lo, hi))


def _pick(*options: str) -> Callable[[_Filler], str]:
    return lambda f: f.rng.choice(options)


def _slot(where: str, value: Any) -> SlotValue:
    """A slot as written in the data files (forms listed atop vocabulary.yaml) -> a drawable."""
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, dict) and len(value) == 1:
        ((kind, arg),) = value.items()
        if kind == "randint":
            lo, hi = arg
            return _int(lo, hi)
        if kind == "pick":
            return _pick(*arg)
        if kind == "generate" and arg == "passage":
            return lambda f: f.passage()
    raise ValueError(
        f"dpray/demo/data: slot {where}: expected a list, {{pick: [...]}}, "
        "{randint: [lo, hi]} or {generate: passage}"
    )


def _slots(where: str, spec: dict[str, Any]) -> dict[str, SlotValue]:
    return {key: _slot(f"{where}.{key}", value) for key, value in spec.items()}


_VOCAB = _load("vocabulary.yaml")
# Fake identity material (all invented; emails use reserved example domains, phones 555-01xx).
_FIRST_NAMES: Sequence[str] = _VOCAB["first_names"]
_LAST_NAMES: Sequence[str] = _VOCAB["last_names"]
_EMAIL_DOMAINS: Sequence[str] = _VOCAB["email_domains"]
_STREETS: Sequence[str] = _VOCAB["streets"]
_STREET_KINDS: Sequence[str] = _VOCAB["street_kinds"]
_TOWNS: Sequence[str] = _VOCAB["towns"]
_MONTHS: Sequence[str] = _VOCAB["months"]
_MEDS: Sequence[Sequence[str]] = _VOCAB["medications"]
_DOSES: Sequence[str] = _VOCAB["doses"]
# Which personal-detail kind each PII slot reveals (used for the ``pii`` tag).
_PII_KIND: dict[str, str] = _VOCAB["pii_kind"]
# Shared slots and the phrases that frame a request.
_COMMON = _slots("common_slots", _VOCAB["common_slots"])
_OPENERS: Sequence[str] = _VOCAB["openers"]
_CLOSERS: Sequence[str] = _VOCAB["closers"]
_CONSTRAINTS: Sequence[str] = _VOCAB["constraints"]
_FOLLOW_UPS: Sequence[str] = _VOCAB["follow_ups"]
_RAMBLES: Sequence[str] = _VOCAB["rambles"]
_GENERIC_PII: Sequence[str] = _VOCAB["generic_pii"]
# Sentence pool for summarisation passages (meeting notes, reviews, articles).
_PASSAGE_SENTENCES: Sequence[str] = _VOCAB["passage_sentences"]
# Texting abbreviations for casual writers.
_CASUAL: dict[str, str] = _VOCAB["casual"]
# Topics: weight, pii_rate, slots, requests, short, contexts, optional pii (see topics.yaml).
_TOPIC_SPECS: dict[str, dict[str, Any]] = {
    name: {**spec, "slots": _slots(name, spec.get("slots", {}))}
    for name, spec in _load("topics.yaml").items()
}


# ---------------------------------------------------------------------------------------------
# Fake identities.
# ---------------------------------------------------------------------------------------------


def _email_for(rng: random.Random, first: str, last: str) -> str:
    f = first.lower().replace("'", "")
    la = last.lower().replace("'", "")
    n = rng.randint(1, 99)
    form = rng.randrange(4)
    if form == 0:
        local = f"{f}.{la}"
    elif form == 1:
        local = f"{f[0]}{la}{n}"
    elif form == 2:
        local = f"{f}_{la}"
    else:
        local = f"{f}{n}"
    return f"{local}@{rng.choice(_EMAIL_DOMAINS)}"


def _phone(rng: random.Random) -> str:
    line = f"01{rng.randint(0, 99):02d}"
    form = rng.randrange(3)
    if form == 0:
        return f"555-{line}"
    if form == 1:
        return f"({rng.randint(201, 989)}) 555-{line}"
    return f"+1 {rng.randint(201, 989)} 555 {line}"


def _address(rng: random.Random) -> str:
    street = f"{rng.randint(2, 980)} {rng.choice(_STREETS)} {rng.choice(_STREET_KINDS)}"
    if rng.random() < 0.3:
        street += f", Apt {rng.randint(1, 40)}"
    return f"{street}, {rng.choice(_TOWNS)} {rng.randint(10000, 99999)}"


def _dob(rng: random.Random) -> str:
    y, m, d = rng.randint(1948, 2004), rng.randint(1, 12), rng.randint(1, 28)
    form = rng.randrange(3)
    if form == 0:
        return f"{m:02d}/{d:02d}/{y}"
    if form == 1:
        return f"{d} {_MONTHS[m - 1]} {y}"
    return f"{y}-{m:02d}-{d:02d}"


def _account(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "-".join(f"{rng.randint(0, 9999):04d}" for _ in range(3))
    return f"ACC-{rng.randint(0, 99_999_999):08d}"


def _iban(rng: random.Random) -> str:
    cc = rng.choice(("GB", "DE", "NL", "FR", "ES"))
    groups = " ".join(f"{rng.randint(0, 9999):04d}" for _ in range(3))
    return f"{cc}00 TEST {groups} {rng.randint(0, 99):02d}"


def _make_persona(rng: random.Random) -> dict[str, str]:
    first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
    med, cond = rng.choice(_MEDS)
    return {
        "my_first": first,
        "my_name": f"{first} {last}",
        "my_email": _email_for(rng, first, last),
        "my_phone": _phone(rng),
        "my_address": _address(rng),
        "my_dob": _dob(rng),
        "my_account": _account(rng),
        "my_iban": _iban(rng),
        "my_med": med,
        "my_condition": cond,
        "my_dose": rng.choice(_DOSES),
    }


def _other_name(f: _Filler) -> str:
    return f"{f.rng.choice(_FIRST_NAMES)} {f.rng.choice(_LAST_NAMES)}"


def _other_email(f: _Filler) -> str:
    # Reuse the third party's name when the template mentions it, so the two agree.
    if "other_name" in f:
        first, last = f["other_name"].split(" ", 1)
    else:
        first, last = f.rng.choice(_FIRST_NAMES), f.rng.choice(_LAST_NAMES)
    return _email_for(f.rng, first, last)


_PII_GENERATORS: dict[str, Callable[[_Filler], str]] = {
    "other_name": _other_name,
    "other_email": _other_email,
    "other_phone": lambda f: _phone(f.rng),
    "other_address": lambda f: _address(f.rng),
    "card_last4": lambda f: f"{f.rng.randint(0, 9999):04d}",
    "policy_no": lambda f: f"POL-{f.rng.randint(100000, 999999)}",
    "claim_no": lambda f: f"CLM-{f.rng.randint(10000, 99999)}-{f.rng.choice('ABCDEFGH')}",
    "tax_ref": lambda f: f"TR-{f.rng.randint(1000000, 9999999)}",
    "order_no": lambda f: f"#{f.rng.choice('ABCKMQXZ')}{f.rng.randint(100000, 999999)}",
}


# ---------------------------------------------------------------------------------------------
# Slot filling.
# ---------------------------------------------------------------------------------------------


class _Filler(dict):
    """``str.format_map`` target that draws each slot lazily (and consistently) from the rng."""

    def __init__(
        self, rng: random.Random, slots: dict[str, SlotValue], persona: dict[str, str]
    ) -> None:
        super().__init__()
        self.rng = rng
        self.slots = slots
        self.persona = persona
        self.pii_kinds: set[str] = set()

    def fill(self, template: str) -> str:
        return template.format_map(self)

    def passage(self) -> str:
        k = self.rng.randint(3, 6)
        sentences = self.rng.sample(_PASSAGE_SENTENCES, k)
        # Fresh filler per sentence so repeated slots ({n}) vary within the passage.
        out = []
        for s in sentences:
            sub = _Filler(self.rng, self.slots, self.persona)
            out.append(sub.fill(s))
        return " ".join(out)

    def _draw(self, key: str) -> str:
        if key in _PII_KIND:
            self.pii_kinds.add(_PII_KIND[key])
            if key in self.persona:
                return self.persona[key]
            return _PII_GENERATORS[key](self)
        base = key.rstrip("0123456789") or key
        spec = self.slots.get(base)
        if spec is None:
            spec = _COMMON.get(base)
        if spec is None:
            raise KeyError(key)
        if callable(spec):
            value = spec(self)
        else:
            value = self.rng.choice(spec)
            if base != key:  # e.g. {dish2}: avoid repeating {dish}
                taken = {v for k, v in self.items() if k.rstrip("0123456789") == base}
                for _ in range(5):
                    if value not in taken:
                        break
                    value = self.rng.choice(spec)
        # Slot values may themselves contain slots (e.g. "since {month}").
        if "{" in value:
            value = value.format_map(self)
        return value

    def __missing__(self, key: str) -> str:
        value = self._draw(key)
        self[key] = value
        return value


# ---------------------------------------------------------------------------------------------
# Styling: openers/closers, lowercase, typos, texting abbreviations.
# ---------------------------------------------------------------------------------------------


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:] if s and s[0].islower() else s


def _typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not idx:
        return text
    i = rng.choice(idx)
    w = words[i]
    j = rng.randrange(1, len(w) - 1)
    op = rng.randrange(3)
    if op == 0:
        w = w[:j] + w[j + 1] + w[j] + w[j + 2 :]
    elif op == 1:
        w = w[:j] + w[j + 1 :]
    else:
        w = w[:j] + w[j] + w[j:]
    words[i] = w
    return " ".join(words)


def _casualise(text: str) -> str:
    words = text.split(" ")
    return " ".join(_CASUAL.get(w.lower(), w) for w in words)


# ---------------------------------------------------------------------------------------------
# Users and records.
# ---------------------------------------------------------------------------------------------

TOPICS: tuple[str, ...] = tuple(_TOPIC_SPECS)
_TOPIC_WEIGHTS = tuple(float(_TOPIC_SPECS[t]["weight"]) for t in TOPICS)


def _weighted_sample(rng: random.Random, items: Sequence[Any], weights: Sequence[float], k: int):
    """k distinct items, sampled without replacement proportional to weight."""
    keys = [(rng.random() ** (1.0 / w) if w > 0 else 0.0, i) for i, w in enumerate(weights)]
    keys.sort(reverse=True)
    return [items[i] for _, i in keys[:k]]


def _make_user(rng: random.Random) -> dict[str, Any]:
    k = rng.randint(2, 4)
    return {
        "persona": _make_persona(rng),
        "favourites": _weighted_sample(rng, TOPICS, _TOPIC_WEIGHTS, k),
        "p_fav": rng.uniform(0.55, 0.85),
        "p_lower": rng.choice((0.0, 0.05, 0.1, 0.3, 0.7)),
        "p_typo": rng.choice((0.0, 0.0, 0.05, 0.15, 0.3)),
        "p_casual": rng.choice((0.0, 0.0, 0.1, 0.4)),
        "p_polite": rng.uniform(0.05, 0.7),
        "p_context": rng.uniform(0.2, 0.75),
        "p_short": rng.choice((0.05, 0.1, 0.15, 0.3)),
    }


def _compose(
    rng: random.Random, topic: str, user: dict[str, Any], with_pii: bool
) -> tuple[str, set[str]]:
    """One instruction: [opener] [context...] [pii] request [follow-up] [constraint] [closer]."""
    spec = _TOPIC_SPECS[topic]
    filler = _Filler(rng, spec["slots"], user["persona"])

    if not with_pii and rng.random() < user["p_short"]:
        text = filler.fill(rng.choice(spec["short"]))
        if rng.random() < 0.4:
            text = _cap(text)
        if rng.random() < user["p_typo"]:
            text = _typo(rng, text)
        return text, filler.pii_kinds

    # (template, optional): optional parts are dropped again if the text gets too long.
    parts: list[tuple[str, bool]] = []
    if rng.random() < user["p_context"]:
        ctx = spec["contexts"]
        k = 2 if (len(ctx) > 2 and rng.random() < 0.35) else 1
        parts.extend((c, True) for c in rng.sample(ctx, k))
    if rng.random() < 0.12:
        parts.append((rng.choice(_RAMBLES), True))

    pii_line = None
    pii_templates = spec.get("pii", ())
    if with_pii and pii_templates and rng.random() < 0.65:
        core = rng.choice(pii_templates)
    else:
        core = rng.choice(spec["requests"])
        if with_pii:
            pii_line = rng.choice(_GENERIC_PII)
    if pii_line and rng.random() < 0.5:
        parts.append((pii_line, False))
        pii_line = None
    parts.append((core, False))
    if pii_line:
        parts.append((pii_line, False))
    if rng.random() < 0.15:
        follow = rng.choice([r for r in spec["requests"] if r != core])
        parts.append((rng.choice(_FOLLOW_UPS) + follow[:1].lower() + follow[1:], True))
    if rng.random() < 0.3:
        parts.append((rng.choice(_CONSTRAINTS), True))

    filled = [(_cap(filler.fill(t)), opt) for t, opt in parts]
    # Keep instructions at most ~_MAX_WORDS words: drop the longest optional parts first.
    while sum(len(t.split()) for t, _ in filled) > _MAX_WORDS and any(o for _, o in filled):
        longest = max((i for i, (_, o) in enumerate(filled) if o), key=lambda i: len(filled[i][0]))
        del filled[longest]
    sentences = [t for t, _ in filled]
    if rng.random() < user["p_polite"]:
        if rng.random() < 0.5:
            opener = rng.choice(_OPENERS)
            first = sentences[0]
            if opener[-1] in ",:" and len(first) > 1 and first[1].islower():
                sentences[0] = first[0].lower() + first[1:]
            sentences.insert(0, opener)
        else:
            sentences.append(rng.choice(_CLOSERS))
    text = " ".join(sentences)

    if rng.random() < user["p_casual"]:
        text = _casualise(text)
    if rng.random() < user["p_lower"]:
        text = text.lower()
        if rng.random() < 0.5:
            text = text.rstrip(".!")
    if rng.random() < user["p_typo"]:
        text = _typo(rng, text)
        if rng.random() < 0.3:
            text = _typo(rng, text)
    return text, filler.pii_kinds


def generate_tagged_records(
    n: int = 3000, seed: int = 0, num_users: int = 300
) -> list[dict[str, Any]]:
    """Like :func:`generate_demo_records` but each record also has ``topic`` and ``pii``.

    Why: tests and evaluation (e.g. checking that PII scrubbing or DP filtering works)
    need ground truth that the plain demo records deliberately do not expose.
    ``pii`` is a sorted list of the fake detail kinds present (empty when none).
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    if num_users < 1:
        raise ValueError("num_users must be >= 1")
    rng = random.Random(seed)
    width = max(4, len(str(num_users)))
    users = [_make_user(rng) for _ in range(num_users)]

    # Zipf-like activity: a random user gets rank r with weight 1/r.
    ranks = list(range(1, num_users + 1))
    rng.shuffle(ranks)
    activity = [1.0 / r for r in ranks]
    if n >= num_users:
        owners = list(range(num_users))
        owners += rng.choices(range(num_users), weights=activity, k=n - num_users)
    else:
        owners = rng.choices(range(num_users), weights=activity, k=n)
    rng.shuffle(owners)

    topics = []
    for u in owners:
        user = users[u]
        if rng.random() < user["p_fav"]:
            topics.append(rng.choice(user["favourites"]))
        else:
            topics.append(rng.choices(TOPICS, weights=_TOPIC_WEIGHTS, k=1)[0])

    # Exactly round(PII_SHARE * n) records carry personal details, chosen by topic propensity.
    n_pii = round(PII_SHARE * n)
    propensity = [max(float(_TOPIC_SPECS[t]["pii_rate"]), 0.02) for t in topics]
    pii_idx = set(_weighted_sample(rng, range(n), propensity, n_pii))

    records = []
    for i, (u, topic) in enumerate(zip(owners, topics, strict=True)):
        text, kinds = _compose(rng, topic, users[u], i in pii_idx)
        records.append(
            {
                "id": f"demo-{i + 1:06d}",
                "user_id": f"user-{u + 1:0{width}d}",
                "text": text,
                "topic": topic,
                "pii": sorted(kinds),
            }
        )
    return records


def generate_demo_records(n: int = 3000, seed: int = 0, num_users: int = 300) -> list[dict]:
    """Synthetic private chat-log records for ``dpray demo`` (offline, deterministic).

    Each record: ``{"id": "demo-000001", "user_id": "user-0042", "text": "..."}``.
    Same ``(n, seed, num_users)`` gives the same list; every user appears at least once
    when ``n >= num_users``; about 20% of texts contain clearly fake personal details.
    """
    return [
        {"id": r["id"], "user_id": r["user_id"], "text": r["text"]}
        for r in generate_tagged_records(n=n, seed=seed, num_users=num_users)
    ]


def write_demo_jsonl(
    path: str | pathlib.Path, n: int = 3000, seed: int = 0, num_users: int = 300
) -> pathlib.Path:
    """Write :func:`generate_demo_records` as JSONL (one record a line) and return the path.

    Why: the pipeline's readers take JSONL files, so the demo materialises its private
    corpus on disk exactly like a provider's exported chat logs would be.
    """
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for rec in generate_demo_records(n=n, seed=seed, num_users=num_users):
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return out
