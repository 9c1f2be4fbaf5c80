"""A linear classifier's smoothed radius is known in closed form: |w·x + b| / ‖w‖.

For f(x) = [w·x + b > 0], P[f(x + δ) = 1] = Φ((w·x + b) / (σ‖w‖)), so the smoothed classifier's
exact radius is d = |w·x + b| / ‖w‖ and the certified radius σ·Φ⁻¹(p_lower) must stay below it.
"""

import numpy as np
import pytest

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.smooth import Smoothed

from .conftest import write_linear

W = np.array([0.8, -1.1, 0.4, 0.9, -0.3, 0.6, 0.2, -0.7, 0.5])


def exact_radius(x: np.ndarray, b: float) -> float:
    return abs(W @ x.ravel() + b) / np.linalg.norm(W)


@pytest.fixture()
def linear(tmp_path):
    def make(b: float) -> Smoothed:
        spec = write_linear(tmp_path / f"linear_{abs(hash(b))}.py", W, b)
        return Smoothed(open_blackbox(spec), sigma=0.5, device="cpu")

    return make


def test_certified_radius_close_to_closed_form_with_n_100k(linear):
    x = np.linspace(0.1, 0.9, 9, dtype=np.float32).reshape(1, 3, 3)
    for b in (0.3, -0.9):
        smoothed = linear(b)
        cert = smoothed.certify_sync(x, n0=100, n=100_000, alpha=0.001)
        truth = exact_radius(x, b)
        assert cert.label == int(W @ x.ravel() + b > 0)
        assert cert.radius <= truth
        assert cert.radius >= 0.95 * truth
        smoothed.close()


def test_certified_radius_never_exceeds_closed_form(linear):
    rng = np.random.default_rng(0)
    smoothed = linear(0.1)
    for seed in range(20):
        x = rng.uniform(0, 1, size=(1, 3, 3)).astype(np.float32)
        smoothed.seed = seed
        cert = smoothed.certify_sync(x, n0=50, n=2000, alpha=0.001)
        if not cert.abstain:
            assert cert.label == int(W @ x.ravel() + 0.1 > 0)
            assert cert.radius <= exact_radius(x, 0.1)
    smoothed.close()


def test_a_local_float_callable_gets_unclipped_noise(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(
        "import numpy as np\nSEEN = []\n"
        "def f(x):\n    SEEN.append((float(x.min()), float(x.max()), x.dtype.str, x.shape))\n"
        "    return np.zeros(len(x), dtype=int)\n"
    )
    bb = open_blackbox(f"python:{src}:f")
    smoothed = Smoothed(bb, sigma=1.0, device="cpu")
    smoothed.predict_sync(np.full((1, 2, 2), 0.5, np.float32), n=500)
    lo, hi, dtype, shape = bb.fn.__globals__["SEEN"][0]
    assert lo < 0 and hi > 1 and dtype == "<f4" and shape[1:] == (1, 2, 2)
    smoothed.close()


def test_wrong_certificates_stay_below_alpha_by_monte_carlo(tmp_path):
    """Over many independent seeds, P[certified radius > true radius] ≤ α (+ MC margin)."""
    spec = write_linear(tmp_path / "cov.py", W, 0.0)
    x = np.full((1, 3, 3), 0.35, np.float32)  # w·x = 0.35·Σw = 0.875 → true radius ≈ 0.444
    truth = exact_radius(x, 0.0)
    smoothed = Smoothed(open_blackbox(spec), sigma=0.5, device="cpu")
    alpha, trials = 0.1, 400
    wrong = 0
    for seed in range(trials):
        smoothed.seed = seed
        cert = smoothed.certify_sync(x, n0=10, n=100, alpha=alpha)
        wrong += cert.radius > truth or (not cert.abstain and cert.label != 1)
    smoothed.close()
    assert wrong / trials <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)
    assert wrong > 0  # the bound is not vacuous: it does fail at about its nominal rate
