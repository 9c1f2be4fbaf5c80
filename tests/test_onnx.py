"""`onnx:FILE.onnx` through onnxruntime, and the model-input options every tensor endpoint shares
(layout, dtype, scale, per-channel mean and std, channel order): real ONNX files exported from
the digits model, compared with the same model run by torch."""

from __future__ import annotations

import asyncio
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.adapters.local import TorchModel
from blackbox_smooth.adapters.modelinput import ModelInput, layout_of
from blackbox_smooth.digits import DigitsCNN, digits_split
from blackbox_smooth.errors import UsageError
from blackbox_smooth.options import ChannelOrder, EndpointOptions, InputDtype, Layout

from .conftest import messages, run_cli

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def export(model: nn.Module, path, example: torch.Tensor, dynamic: bool = True) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "n"}} if dynamic else None,
            dynamo=False,
        )
    return str(path)


class PhotoConvention(nn.Module):
    """The digits model behind a photo model's convention: 3-channel BGR, NHWC, ImageNet mean
    and std; it undoes them, so fed right it answers as the digits model on the gray image."""

    def __init__(self, digits: nn.Module) -> None:
        super().__init__()
        self.digits = digits
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = x.permute(0, 3, 1, 2).flip(1) * self.std + self.mean
        return self.digits(rgb.mean(1, keepdim=True))


class Uint8NHWC(nn.Module):
    def __init__(self, digits: nn.Module) -> None:
        super().__init__()
        self.digits = digits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.digits(x.permute(0, 3, 1, 2).float() / 255.0)


@pytest.fixture(scope="module")
def digits_net(digits_model):
    """The demo's model as a plain module (the ONNX exporter traces it), weights from its file."""
    net = DigitsCNN()
    net.load_state_dict(torch.jit.load(str(digits_model)).state_dict())
    return net.eval()


@pytest.fixture(scope="module")
def noisy():
    """12 held-out digits with σ = 0.5 noise (unclipped, as the adapters receive them)."""
    _, _, x_te, _ = digits_split()
    x = torch.from_numpy(x_te[:12])
    return x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))


def classify(box, images):
    return asyncio.run(box.classify(images))


def reference(digits_net, images: torch.Tensor) -> np.ndarray:
    """The digits model's softmax on the clipped images: what every ONNX form must answer."""
    with torch.no_grad():
        return torch.softmax(digits_net(images.clamp(0, 1)), 1).numpy()


def softmax(scores: np.ndarray) -> np.ndarray:
    e = np.exp(scores - scores.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_an_onnx_model_answers_as_the_same_model_in_torch(digits_net, noisy, tmp_path):
    path = export(digits_net, tmp_path / "digits.onnx", torch.zeros(1, 1, 28, 28))
    box = open_blackbox(f"onnx:{path}")
    assert box.cache_by_default and box.max_batch == 1024
    assert box.description["layout"] == "nchw" and box.description["dtype"] == "fp32"
    answer = classify(box, noisy)
    np.testing.assert_allclose(softmax(answer.scores), reference(digits_net, noisy), atol=1e-4)
    # the file's digest identifies it: another file, another fingerprint
    other = export(nn.Sequential(digits_net, nn.ReLU()), tmp_path / "b.onnx", noisy[:1])
    assert open_blackbox(f"onnx:{other}").fingerprint != box.fingerprint


def test_the_input_spec_is_read_from_the_file_uint8_nhwc(digits_net, noisy, tmp_path):
    example = torch.zeros(1, 28, 28, 1, dtype=torch.uint8)
    path = export(Uint8NHWC(digits_net), tmp_path / "u8.onnx", example)
    box = open_blackbox(f"onnx:{path}")
    assert box.description["layout"] == "nhwc" and box.description["dtype"] == "uint8"
    assert box.description["scale"] == 255.0
    rounded = (noisy.clamp(0, 1) * 255).round() / 255
    np.testing.assert_allclose(
        softmax(classify(box, noisy).scores), reference(digits_net, rounded), atol=1e-4
    )


def test_mean_std_and_channel_order_make_a_photo_models_convention(digits_net, noisy, tmp_path):
    """A 3-channel BGR NHWC model normalised with ImageNet's mean and std: fed with the flags,
    it answers as the digits model on the gray image; without them, differently."""
    path = export(PhotoConvention(digits_net), tmp_path / "photo.onnx", torch.zeros(1, 28, 28, 3))
    rgb = noisy.repeat(1, 3, 1, 1)
    flags = EndpointOptions(
        input_mean=",".join(map(str, MEAN)), input_std=",".join(map(str, STD)), channel_order="bgr"
    )
    box = open_blackbox(f"onnx:{path}", flags)
    assert box.description["layout"] == "nhwc"  # read from the file's [n, 28, 28, 3]
    # normalising and undoing it in float32 is exact to ~1e-6 per pixel, ~1e-3 after the model
    np.testing.assert_allclose(
        softmax(classify(box, rgb).scores), reference(digits_net, noisy), atol=2e-3
    )
    plain = open_blackbox(f"onnx:{path}")
    assert plain.fingerprint != box.fingerprint  # the normalisation is part of the classifier
    assert not np.allclose(softmax(classify(plain, rgb).scores), reference(digits_net, noisy))


def test_a_fixed_batch_size_is_obeyed_and_a_fixed_image_size_named(digits_net, noisy, tmp_path):
    path = export(digits_net, tmp_path / "b4.onnx", torch.zeros(4, 1, 28, 28), dynamic=False)
    box = open_blackbox(f"onnx:{path}")
    assert box.max_batch == 4
    part = classify(box, noisy[:3])  # a short batch is padded to 4, the answer cut to 3
    np.testing.assert_allclose(softmax(part.scores), reference(digits_net, noisy[:3]), atol=1e-4)
    with pytest.raises(UsageError, match=r"takes 1×28x28 images, these are 1×32×32.*--size 28x28"):
        classify(box, torch.zeros(2, 1, 32, 32))


def test_certify_on_an_onnx_endpoint_from_the_cli_is_cached(digits_net, digit_images, tmp_path):
    path = export(digits_net, tmp_path / "digits.onnx", torch.zeros(1, 1, 28, 28))
    args = ["certify", "-e", f"onnx:{path}", "--sigma", "0.25", "--n", "200"]
    args += ["--cache", str(tmp_path / "cache"), str(digit_images[0])]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert "queries: 300 sent" in first.stdout
    again = run_cli(*args)
    assert again.returncode == 0 and "queries: 0 sent" in again.stdout, again.stdout
    rows = [line.split()[:4] for line in (first.stdout, again.stdout)]
    assert rows[0] == rows[1]


@pytest.mark.parametrize(
    ("endpoint", "flags", "message"),
    [
        ("onnx:{tmp}/missing.onnx", [], "ONNX file not found"),
        ("onnx:{tmp}/text.onnx", [], "is not an ONNX model onnxruntime can run"),
        ("python:{tmp}/f.py:f", ["--input-mean", "0.5"], "--input-mean describes a model's input"),
        ("onnx:{tmp}/missing.onnx", ["--input-std", "1,x"], "--input-std '1,x' is not a list"),
        ("onnx:{tmp}/missing.onnx", ["--channel-order", "gbr"], "'gbr' is not one of 'rgb', 'bgr'"),
    ],
)
def test_bad_onnx_endpoints_and_input_flags_are_one_line_errors(
    endpoint, flags, message, digit_images, tmp_path
):
    (tmp_path / "text.onnx").write_text("not a model")
    (tmp_path / "f.py").write_text("def f(x):\n    return x.reshape(len(x), -1)[:, :10]\n")
    spec = endpoint.format(tmp=tmp_path)
    result = run_cli("certify", "-e", spec, "--sigma", "0.25", *flags, str(digit_images[0]))
    err = result.stderr
    assert result.returncode == 2 and message in err and "Traceback" not in err, err
    assert len(messages(err)) == 1


def test_without_onnxruntime_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(UsageError, match=r"pip install 'blackbox_smooth\[onnx\]'"):
        open_blackbox(f"onnx:{tmp_path / 'm.onnx'}")


def test_model_input_maps_clipped_pixels_to_the_models_convention():
    x = torch.tensor([[[[-0.2, 0.5]], [[0.25, 1.3]], [[0.0, 0.998]]]])  # 1×3×1×2
    assert ModelInput().apply(x).tolist() == x.clamp(0, 1).tolist()
    u8 = ModelInput(dtype=InputDtype.uint8, layout=Layout.nhwc).apply(x)
    assert u8.dtype == np.uint8 and u8.tolist() == [[[[0, 64, 0], [128, 255, 254]]]]
    bgr = ModelInput(channel_order=ChannelOrder.bgr).apply(x)
    assert np.array_equal(bgr[0], x.clamp(0, 1)[0].flip(0).numpy())
    norm = ModelInput(scale=255.0, mean=(100.0, 50.0, 0.0), std=(2.0,)).apply(x)
    expected = (x.clamp(0, 1) * 255 - torch.tensor([100.0, 50.0, 0.0]).view(1, 3, 1, 1)) / 2
    assert norm.dtype == np.float32 and np.allclose(norm, expected.numpy())
    flat = ModelInput(layout=Layout.flat).apply(x)
    assert flat.shape == (1, 6) and flat.flags.c_contiguous


def test_model_input_in_numpy_gives_torch_float32_values_bit_for_bit():
    """The mapping runs in numpy (no torch thread pool per request); its values must be the
    ones torch's float32 operations give, ties rounded to even included, or cached answers
    and certificates would silently change meaning."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 7, generator=gen) * 0.6 + 0.5
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, 2.5, 253.5]) / 255  # ties after scaling
    clipped = x.clamp(0, 1)
    cases = [
        (ModelInput(dtype=InputDtype.uint8), (clipped * 255.0).round().clamp(0, 255).byte()),
        (ModelInput(scale=255.0, mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4)),
         (clipped * 255.0 - torch.tensor([123.7, 116.3, 103.5]).view(1, 3, 1, 1))
         / torch.tensor([58.4, 57.1, 57.4]).view(1, 3, 1, 1)),
        (ModelInput(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    channel_order=ChannelOrder.bgr, layout=Layout.nhwc),
         ((clipped.flip(1) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
          / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)).permute(0, 2, 3, 1)),
    ]  # fmt: skip
    for model_input, expected in cases:
        got = model_input.apply(x)
        assert got.dtype == expected.numpy().dtype
        assert np.array_equal(got, expected.numpy()), model_input


def test_model_input_refuses_what_it_cannot_map():
    x = torch.zeros(1, 3, 1, 2)
    with pytest.raises(UsageError, match="apply to fp32 inputs"):
        ModelInput(dtype=InputDtype.uint8, mean=(0.5,))
    with pytest.raises(UsageError, match="2 values for 3-channel"):
        ModelInput(mean=(0.5, 0.5)).apply(x)
    assert layout_of(["n", 3, 224, 224]) == "nchw" and layout_of([-1, 224, 224, 3]) == "nhwc"
    assert layout_of([-1, 784]) == "flat" and layout_of(None) is None


def test_torch_endpoints_take_the_same_input_flags(digits_net, noisy, digits_model, tmp_path):
    """torch:FILE.pt gets the noisy values unclipped by default (its fingerprint unchanged);
    with input flags it is fed as an onnx or OIP model would be."""
    plain = open_blackbox(f"torch:{digits_model}")
    assert isinstance(plain, TorchModel) and "input" not in plain.description
    path = tmp_path / "photo.pt"
    torch.jit.save(torch.jit.script(PhotoConvention(digits_net)), str(path))
    flags = EndpointOptions(
        input_layout="nhwc",
        input_mean=",".join(map(str, MEAN)),
        input_std=",".join(map(str, STD)),
        channel_order="bgr",
    )
    box = open_blackbox(f"torch:{path}", flags)
    assert box.description["input"]["channel_order"] == "bgr"
    got = classify(box, noisy.repeat(1, 3, 1, 1)).scores
    np.testing.assert_allclose(got, reference(digits_net, noisy), atol=2e-3)
