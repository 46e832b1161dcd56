"""pytest-benchmark: FAIG engine strategies against the naive loop (the paper's per-step passes).

MSRResNet 16×64 ×2 (the paper's size; random-init pair unless a trained ``msrresnet_paper`` pair is
shipped), two 32×32 LR crops (one blurry, one noisy), N steps of the left Riemann rule, plus the
engine with Gauss–Legendre at the node count from ``faig study quadrature``.  Run on an idle machine:
``.venv/bin/python -m pytest benchmarks/bench_engine.py``.  A quick smoke run of every case (a few seconds):
``FAIG_BENCH_PRESET=tiny FAIG_BENCH_STEPS=2 FAIG_BENCH_GL_NODES=2 python -m pytest benchmarks/ --benchmark-disable``.
``faig bench`` writes the same comparison as JSON, with its roofline.
"""
from __future__ import annotations

import os

import pytest
import torch

from faig_fast.core.api import attribute
from faig_fast.apps.bench import _images, _pair
from faig_fast.core.reference import reference_attribute

STEPS = int(os.environ.get("FAIG_BENCH_STEPS", "20"))
GL_NODES = int(os.environ.get("FAIG_BENCH_GL_NODES", "12"))
PRESET = os.environ.get("FAIG_BENCH_PRESET", "paper")
SIZE = int(os.environ.get("FAIG_BENCH_SIZE", "32"))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def setup():
    a, b, _ = _pair("msrresnet", PRESET)
    items, _ = _images(SIZE, 2)
    return a.to(DEVICE), b.to(DEVICE), [(x.to(DEVICE), y.to(DEVICE), l) for x, y, l in items]


def test_naive_loop(benchmark, setup):
    a, b, items = setup
    benchmark.pedantic(reference_attribute, args=(a, b, items, STEPS), rounds=1, iterations=1)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "linear", "persample"])
def test_engine(benchmark, setup, strategy):
    a, b, items = setup
    benchmark.pedantic(attribute, args=(a, b, items), kwargs={"steps": STEPS, "strategy": strategy},
                       rounds=1, iterations=1)


def test_engine_gauss_legendre(benchmark, setup):
    a, b, items = setup
    benchmark.pedantic(attribute, args=(a, b, items), kwargs={"steps": GL_NODES, "method": "gausslegendre"},
                       rounds=1, iterations=1)
