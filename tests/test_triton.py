"""Integration with a real Triton Inference Server (PyTriton's `tritonserver`, from its own
environment .venv-triton, made by `make test`): the input convention read from the model's
metadata, the binary tensor extension both ways, each model's `max_batch_size` obeyed and a
larger --batch refused with what to do, uint8 NHWC inputs. Answers through Triton must equal
the same linear classifier computed here on the same noise."""

from __future__ import annotations

import asyncio
import json
import sysconfig

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.adapters.kserve import KServe
from blackbox_smooth.data import save_image
from blackbox_smooth.digits import digits_split
from blackbox_smooth.errors import ProtocolError
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
@pytest.mark.process
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


@pytest.mark.process
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


@pytest.mark.process
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


@pytest.mark.process
def test_options_given_in_full_still_obey_the_model(triton):
    """Layout, dtype and name given by the user: the metadata is not needed, yet the server's
    extensions and the model's batch limit are still read."""
    given = EndpointOptions(input_layout="nhwc", input_dtype="uint8", input_name="pixels")
    box = open_blackbox(f"{triton}/v2/models/digits_u8/infer", given)
    assert isinstance(box, KServe) and box.binary and box.max_batch == 8


def _binary_box() -> KServe:
    box = open_blackbox(
        "http://127.0.0.1:1/v2/models/m/infer",
        EndpointOptions(input_layout="nchw", input_dtype="fp32", input_name="x", retries=1),
    )
    assert isinstance(box, KServe)
    return box


def _reply(header: dict, raw: bytes, length: str | None = None):
    import httpx

    from blackbox_smooth.adapters.http import Reply

    text = json.dumps(header).encode()
    headers = {"inference-header-content-length": length or str(len(text))}
    return Reply(200, httpx.Headers(headers), text + raw)


def _scores_output(size: int, shape: list[int]) -> dict:
    return {"outputs": [{"name": "s", "datatype": "FP32", "shape": shape,
                         "parameters": {"binary_data_size": size}}]}  # fmt: skip


def test_a_binary_answer_is_read_exactly_and_every_lie_in_it_refused():
    """Offline (no server): a hostile server's binary answers, each lie one ProtocolError."""
    box = _binary_box()
    scores = np.array([[0.1, 0.9], [0.8, 0.2]], dtype="<f4")
    good = box.parse_reply(_reply(_scores_output(16, [2, 2]), scores.tobytes()), 2)
    assert good.labels.tolist() == [1, 0] and np.array_equal(good.scores, scores)
    lies = [
        _reply(_scores_output(16, [2, 2]), scores.tobytes()[:12]),  # fewer bytes than it says
        _reply(_scores_output(12, [2, 2]), scores.tobytes()),  # size and shape disagree
        _reply(_scores_output(16, [2, 2]), scores.tobytes(), length="999999"),  # header past end
        _reply(_scores_output(16, [2, 2]), scores.tobytes(), length="-3"),
        _reply(_scores_output(1 << 40, [1 << 38]), b""),  # a terabyte announced
        _reply(_scores_output(16, [2, 2, 1]), scores.tobytes()),  # 3 dimensions
    ]
    for reply in lies:
        with pytest.raises(ProtocolError):
            box.parse_reply(reply, 2)
    # a server that ignored the binary request and answered JSON is read as JSON
    import httpx

    from blackbox_smooth.adapters.http import Reply

    plain = {"outputs": [{"name": "s", "datatype": "FP32", "shape": [2, 2], "data": [0, 1, 1, 0]}]}
    answer = box.parse_reply(Reply(200, httpx.Headers({}), json.dumps(plain).encode()), 2)
    assert answer.labels.tolist() == [1, 0]
