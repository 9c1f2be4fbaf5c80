"""Integration with a real Triton Inference Server (PyTriton's `tritonserver`, from its own
environment .venv-triton, made by `make test`): the input convention read from the model's
metadata, the binary tensor extension both ways, each model's `max_batch_size` obeyed and a
larger --batch refused with what to do, uint8 NHWC inputs. Answers through Triton must equal
the same linear classifier computed here on the same noise."""

from __future__ import annotations

import asyncio
import sysconfig

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.adapters.kserve import KServe
from blackbox_smooth.data import save_image
from blackbox_smooth.digits import digits_split
from blackbox_smooth.options import EndpointOptions
from blackbox_smooth.serve import free_port
from blackbox_smooth.smooth import Smoothed

from .conftest import ROOT, run_cli
from .harness import serving

PYTHON = ROOT / ".venv-triton" / "bin" / "python"


@pytest.fixture(scope="module")
def weights():
    """A linear classifier of the 28×28 digits: what the Triton models compute."""
    x, y, _, _ = digits_split()
    model = LogisticRegression(max_iter=300).fit(x.reshape(len(x), -1), y)
    return model.coef_.astype(np.float32), model.intercept_.astype(np.float32)


@pytest.fixture(scope="module")
def triton(tmp_path_factory, weights):
    if not PYTHON.exists():
        pytest.fail("PyTriton is not installed: `make test` creates .venv-triton")
    root = tmp_path_factory.mktemp("triton")
    np.savez(root / "weights.npz", w=weights[0], b=weights[1])
    port = free_port()
    # tritonserver links against the interpreter's libpython
    libdir = sysconfig.get_config_var("LIBDIR")
    command = [str(PYTHON), str(ROOT / "tests" / "triton_server.py"), "weights.npz", str(port)]
    base = f"http://127.0.0.1:{port}"
    env = {"LD_LIBRARY_PATH": libdir}
    # the models load one by one after the server is up: wait for the last one
    ready = f"{base}/v2/models/digits_u8/ready"
    with serving(command, ready, root / "triton.log", env, within=180):
        yield base


def scores_here(weights, images: torch.Tensor, uint8: bool) -> np.ndarray:
    x = images.clamp(0, 1)
    if uint8:
        x = (x * 255).round() / 255
    w, b = weights
    return x.reshape(len(x), -1).numpy() @ w.T + b


def noisy_digits(count: int) -> torch.Tensor:
    _, _, x_te, _ = digits_split()
    x = torch.from_numpy(x_te[:count])
    return x + 0.25 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("model", "uint8", "limit"), [("digits", False, 16), ("digits_u8", True, 8)]
)
def test_triton_metadata_binary_tensors_and_max_batch_size(triton, weights, model, uint8, limit):
    box = open_blackbox(f"{triton}/v2/models/{model}/infer")
    assert isinstance(box, KServe)
    assert box.binary  # Triton lists binary_tensor_data
    assert box.max_batch == limit  # from GET /v2/models/NAME/config, below the default 64
    expected = ("nhwc", "uint8") if uint8 else ("nchw", "fp32")
    assert (box.description["layout"], box.description["dtype"]) == expected
    assert box.description["input_name"] == "pixels"
    images = noisy_digits(limit)
    binary = asyncio.run(box.classify(images))
    np.testing.assert_allclose(binary.scores, scores_here(weights, images, uint8), atol=1e-4)
    box.binary = False  # the same request as JSON text: the same answer
    as_json = asyncio.run(box.classify(images))
    np.testing.assert_array_equal(as_json.scores, binary.scores)


def test_certify_through_triton_equals_the_classifier_here(triton, weights, tmp_path):
    """Counts through Triton (binary tensors, requests of ≤ 16) equal those of the same linear
    classifier run in-process on the same noise."""
    _, _, x_te, _ = digits_split()
    reference = tmp_path / "linear.py"
    np.savez(tmp_path / "w.npz", w=weights[0], b=weights[1])
    reference.write_text(
        "import numpy as np\n"
        f"W = np.load({str(tmp_path / 'w.npz')!r})\n"
        "def f(x):\n"
        "    x = np.clip(x, 0, 1).reshape(len(x), -1)\n"
        "    return x @ W['w'].T + W['b']\n"
    )
    x = torch.from_numpy(x_te[:2])
    through = Smoothed(open_blackbox(f"{triton}/v2/models/digits/infer"), 0.25, seed=3)
    here = Smoothed(open_blackbox(f"python:{reference}:f"), 0.25, seed=3)
    for image in x:
        a = through.certify_sync(image, n0=64, n=256, alpha=0.001)
        b = here.certify_sync(image, n0=64, n=256, alpha=0.001)
        assert (a.label, a.radius, a.counts) == (b.label, b.radius, b.counts)
        assert not a.abstain  # a real certificate, not two abstentions
    through.close()
    here.close()


def test_a_batch_over_the_models_limit_is_refused_before_any_query(triton, tmp_path):
    _, _, x_te, _ = digits_split()
    save_image(x_te[0], tmp_path / "d.png")
    url = f"{triton}/v2/models/digits/infer"
    result = run_cli(
        "certify", str(tmp_path / "d.png"), "-e", url, "--sigma", "0.25", "--batch", "64"
    )
    assert result.returncode == 2
    assert "--batch 64 is over the model's max_batch_size of 16" in result.stderr
    assert "use --batch 16 or less" in result.stderr and "Traceback" not in result.stderr


def test_options_given_in_full_still_obey_the_model(triton):
    """Layout, dtype and name given by the user: the metadata is not needed, yet the server's
    extensions and the model's batch limit are still read."""
    given = EndpointOptions(input_layout="nhwc", input_dtype="uint8", input_name="pixels")
    box = open_blackbox(f"{triton}/v2/models/digits_u8/infer", given)
    assert isinstance(box, KServe) and box.binary and box.max_batch == 8
