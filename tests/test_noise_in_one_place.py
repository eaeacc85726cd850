"""Every DP release draws its noise in ``dpray/privacy/`` (issue #14, defect 8).

The package is scanned (its syntax tree, so comments and strings do not count) for calls that
draw noise -- ``np.random.normal``, ``rng.normal``, ``torch.randn``, ``torch.normal``,
``tensor.normal_``, Laplace/Poisson draws, ``torch.distributions.Normal`` ... .  Outside
``dpray/privacy/`` only the allow-listed, non-DP uses below may appear; a new noise draw for a
release belongs in :mod:`dpray.privacy.mechanisms` with its randomness policy and ledger event.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import dpray
from dpray.privacy.events import GaussianEvent, PoissonSubsampledGaussianEvent
from dpray.privacy.mechanisms import gaussian

PACKAGE = Path(dpray.__file__).resolve().parent
PRIVACY = PACKAGE / "privacy"

NOISE_CALLS = {
    "normal",
    "normal_",
    "standard_normal",
    "randn",
    "randn_like",
    "multivariate_normal",
    "laplace",
    "poisson",
    "gauss",
    "normalvariate",
    "Normal",
    "MultivariateNormal",
    "Laplace",
    "Poisson",
}

# (path relative to dpray/, called name) -> why it is not a DP release.  Today nothing outside
# dpray/privacy/ draws noise; model init (transformers' own init) and token sampling
# (``model.generate`` / vLLM) draw inside their libraries, not in dpray's code.  Add an entry
# here only for randomness that no privacy argument relies on, and say why.
ALLOWED: dict[tuple[str, str], str] = {}


def noise_calls(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every call in ``source`` whose callee is named like a noise draw."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in NOISE_CALLS:
            found.append((node.lineno, name))
    return found


def package_noise_calls() -> dict[Path, list[tuple[int, str]]]:
    calls = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        hits = noise_calls(path.read_text())
        if hits:
            calls[path] = hits
    return calls


def test_the_scanner_sees_noise_draws():
    source = (
        "import numpy as np, torch\n"
        "rng.normal(0, 1, size=3)\n"
        "np.random.normal(size=2)\n"
        "torch.randn(3, generator=g)\n"
        "x.normal_(std=2)\n"
        "torch.distributions.Normal(0, 1)\n"
        "# rng.normal(0, 1) in a comment\n"
        "s = 'font-weight:normal'\n"
        "np.random.default_rng(3).random(5)\n"
    )
    assert [line for line, _ in noise_calls(source)] == [2, 3, 4, 5, 6]
    calls = package_noise_calls()  # and finds the real draws where they belong
    assert PRIVACY / "mechanisms" / "gaussian.py" in calls
    assert PRIVACY / "secure_agg" / "skellam.py" in calls


def test_no_module_outside_dpray_privacy_draws_noise():
    outside = []
    for path, hits in package_noise_calls().items():
        if path.is_relative_to(PRIVACY):
            continue
        rel = path.relative_to(PACKAGE).as_posix()
        outside += [f"{rel}:{line}: {name}(" for line, name in hits if (rel, name) not in ALLOWED]
    assert not outside, (
        "noise for a DP release must be drawn in dpray/privacy/mechanisms/ (or allow-listed "
        "here with the reason it is not a release):\n" + "\n".join(outside)
    )


def test_stages_release_through_the_gaussian_mechanism():
    from dpray.stages.filter import core, histogram
    from dpray.stages.train_generator import noise
    from dpray.stages.train_generator.strategies import private_evolution

    assert core.gaussian_release is gaussian.gaussian_release
    assert private_evolution.gaussian_release is gaussian.gaussian_release
    assert private_evolution.secret_rng is gaussian.secret_rng
    assert histogram.secret_rng is gaussian.secret_rng  # re-exported for benchmarks/filter.py
    assert noise.add_gaussian_noise_ is gaussian.add_gaussian_noise_


def test_gaussian_release_std_randomness_and_event():
    noisy = gaussian.gaussian_release(np.zeros(200_000), 3.0, np.random.default_rng(2))
    assert noisy.std() == pytest.approx(3.0, rel=0.02)
    # the default generator is secret and fresh: two releases never share their noise
    assert not np.array_equal(
        gaussian.gaussian_release(np.zeros(8), 1.0), gaussian.gaussian_release(np.zeros(8), 1.0)
    )
    assert not np.array_equal(gaussian.secret_rng().random(4), gaussian.secret_rng().random(4))
    with pytest.raises(ValueError):
        gaussian.gaussian_release(np.zeros(2), -1.0)
    event = gaussian.gaussian_event("filter", 3.0, 2.0, count=4, run_id="r")
    assert isinstance(event, GaussianEvent)
    assert (event.stage, event.noise_multiplier, event.count, event.run_id) == (
        "filter",
        1.5,
        4,
        "r",
    )
    sub = gaussian.subsampled_gaussian_event("train-generator", 1.1, 0.01, 7, run_id="x")
    assert isinstance(sub, PoissonSubsampledGaussianEvent)
    assert (sub.noise_multiplier, sub.sampling_rate, sub.steps, sub.run_id) == (1.1, 0.01, 7, "x")


def test_torch_noise_std_and_secret_generator():
    total = torch.zeros(100_000)
    out = gaussian.add_gaussian_noise_(total, 2.5, gaussian.secret_torch_generator())
    assert out is total and float(total.std()) == pytest.approx(2.5, rel=0.02)
    untouched = torch.ones(3)
    assert torch.equal(gaussian.add_gaussian_noise_(untouched, 0.0), torch.ones(3))
    a = gaussian.add_gaussian_noise_(torch.zeros(8), 1.0)
    b = gaussian.add_gaussian_noise_(torch.zeros(8), 1.0)
    assert not torch.equal(a, b)
