"""The smallest validation case: predicted vs measured peak memory of real training steps."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import model_validation as mv  # noqa: E402


def test_smallest_case_within_5_percent():
    torch.set_num_threads(1)
    case = mv.CASES[0]
    pred, meas = mv.predict(case), mv.measure(case, steps=2)
    assert abs(pred["total"] / meas["peak"] - 1) < 0.05
    held = mv.predict(case, persistent_grads=True)
    static = held["weights"] + held["gradients"] + held["optimizer"]
    assert abs(static / meas["static"] - 1) < 0.02
