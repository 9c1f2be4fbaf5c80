"""Input presets (--preset imagenet|clip|caffe), the ways an image meets --size (--resize
stretch|letterbox|center-crop, --fill) and the one-line hint when a local model seems to want
another input convention: against hand-computed values, the identity of a preset against its
flags spelled out, and one-line errors through the CLI."""

from __future__ import annotations

import asyncio
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from blackbox_smooth.adapters import open_blackbox
from blackbox_smooth.adapters.local import convention_hint
from blackbox_smooth.adapters.modelinput import ModelInput
from blackbox_smooth.data import STRETCH, Fit, fit_image, load_image
from blackbox_smooth.errors import UsageError
from blackbox_smooth.options import EndpointOptions, ImageOptions

from .conftest import messages, run_cli

IMAGENET = {"input_mean": "0.485,0.456,0.406", "input_std": "0.229,0.224,0.225"}
CLIP = {
    "input_mean": "0.48145466,0.4578275,0.40821073",
    "input_std": "0.26862954,0.26130258,0.27577711",
}
CAFFE = {"channel_order": "bgr", "input_scale": 255.0, "input_mean": "103.939,116.779,123.68"}
SPELLED = {"imagenet": IMAGENET, "clip": CLIP, "caffe": CAFFE}
HINT = "under --preset imagenet: check the model's input convention"

# A photo model in miniature: class 0 for a bright image, 1 for a dark one, by the sign of its
# mean input value; it keeps the last input it was given. On [0,1] pixels every image is
# "bright"; ImageNet-normalised, a dark one is dark.
MODEL = """
import torch
from torch import nn


class Brightness(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("sign", torch.tensor([1.0, -1.0]))
        self.last = None

    def forward(self, x):
        self.last = x.detach().clone()
        return x.float().mean(dim=(1, 2, 3))[:, None] * self.sign


def make():
    return Brightness()
"""


class Brightness(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("sign", torch.tensor([1.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None] * self.sign


@pytest.fixture()
def torch_model(tmp_path) -> str:
    path = tmp_path / "brightness.py"
    path.write_text(textwrap.dedent(MODEL))
    return f"torch:{path}:make"


@pytest.fixture()
def onnx_model(tmp_path) -> str:
    path = tmp_path / "brightness.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Brightness(),
            (torch.zeros(1, 3, 8, 8),),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "n"}},
            dynamo=False,
        )
    return f"onnx:{path}"


def rgb_png(path, value: float | np.ndarray, size=(8, 8)):
    """An RGB PNG of one grey `value`, or of the H×W×3 uint8 array `value`."""
    if isinstance(value, np.ndarray):
        pixels = value
    else:
        pixels = np.full((*size, 3), round(value * 255), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return str(path)


# -- presets -------------------------------------------------------------------------------


def test_a_preset_fills_the_convention_and_a_flag_given_replaces_its_part():
    imagenet = EndpointOptions(preset="imagenet")
    assert (imagenet.input_mean, imagenet.input_std) == tuple(IMAGENET.values())
    assert (imagenet.channel_order, imagenet.input_scale) == ("rgb", 1.0)
    caffe = EndpointOptions(preset="caffe")
    assert caffe.channel_order == "bgr" and caffe.input_scale == 255.0
    assert caffe.input_mean == CAFFE["input_mean"] and caffe.input_std is None  # std 1
    mixed = EndpointOptions(preset="caffe", channel_order="rgb", input_std="58")
    assert mixed.channel_order == "rgb" and mixed.input_std == "58"
    assert mixed.input_mean == CAFFE["input_mean"] and mixed.input_scale == 255.0
    with pytest.raises(UsageError, match=r"--preset 'vgg' is unknown: use imagenet, clip, caffe"):
        EndpointOptions(preset="vgg")


def test_each_preset_feeds_the_model_the_hand_computed_values(torch_model):
    # one pixel pair per channel: R (0, 1), G (0.5, 0.25), B (1, 0.2)
    x = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.25]], [[1.0, 0.2]]]])
    expected = {
        "imagenet": [
            [(0 - 0.485) / 0.229, (1 - 0.485) / 0.229],
            [(0.5 - 0.456) / 0.224, (0.25 - 0.456) / 0.224],
            [(1 - 0.406) / 0.225, (0.2 - 0.406) / 0.225],
        ],
        "clip": [
            [(0 - 0.48145466) / 0.26862954, (1 - 0.48145466) / 0.26862954],
            [(0.5 - 0.4578275) / 0.26130258, (0.25 - 0.4578275) / 0.26130258],
            [(1 - 0.40821073) / 0.27577711, (0.2 - 0.40821073) / 0.27577711],
        ],
        # BGR, ×255, less the BGR mean: B 255 − 103.939, 51 − 103.939; G 127.5 − 116.779, …
        "caffe": [[151.061, -52.939], [10.721, -53.029], [-123.68, 131.32]],
    }
    for preset, values in expected.items():
        box = open_blackbox(torch_model, EndpointOptions(preset=preset))
        asyncio.run(box.classify(x))
        seen = box.model.last
        assert seen.dtype == torch.float32 and seen.shape == (1, 3, 1, 2)
        np.testing.assert_allclose(seen[0, :, 0].numpy(), values, rtol=0, atol=1e-4)
        # and the same values as the ModelInput of the flags spelled out
        spelled = ModelInput.of(EndpointOptions(**SPELLED[preset])).apply(x)
        assert np.array_equal(seen.numpy(), spelled), preset


@pytest.mark.parametrize("preset", ["imagenet", "clip", "caffe"])
def test_a_preset_is_the_same_classifier_as_its_flags_spelled_out(preset, onnx_model, torch_model):
    for endpoint in (onnx_model, torch_model):
        by_preset = open_blackbox(endpoint, EndpointOptions(preset=preset))
        by_hand = open_blackbox(endpoint, EndpointOptions(**SPELLED[preset]))
        assert by_preset.description == by_hand.description, endpoint
        assert by_preset.fingerprint == by_hand.fingerprint, endpoint
        assert by_preset.fingerprint != open_blackbox(endpoint).fingerprint
    # a flag over a preset: the classifier of the flags it then stands for
    over = open_blackbox(onnx_model, EndpointOptions(preset=preset, input_std="0.5"))
    hand = open_blackbox(onnx_model, EndpointOptions(**{**SPELLED[preset], "input_std": "0.5"}))
    assert over.fingerprint == hand.fingerprint


def test_a_preset_and_its_flags_share_the_cache(onnx_model, tmp_path):
    image = rgb_png(tmp_path / "grey.png", 0.3)
    base = ["certify", "-e", onnx_model, "--sigma", "0.25", "--n0", "10", "--n", "40"]
    base += ["--cache", str(tmp_path / "cache"), image]
    first = run_cli(*base, "--preset", "caffe")
    assert first.returncode == 0, first.stderr
    assert "queries: 50 sent" in first.stdout, first.stdout
    spelled = ["--channel-order", "bgr", "--input-scale", "255"]
    again = run_cli(*base, *spelled, "--input-mean", CAFFE["input_mean"])
    assert again.returncode == 0 and "queries: 0 sent" in again.stdout, again.stdout
    assert first.stdout.splitlines()[1].split()[:4] == again.stdout.splitlines()[1].split()[:4]


# -- --resize ------------------------------------------------------------------------------

PIXELS = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], dtype=np.uint8)  # 2×4, grey


def test_letterbox_pads_a_wide_image_with_the_fill_rounded_to_8_bits():
    grey = Image.fromarray(PIXELS, "L")
    boxed = np.asarray(fit_image(grey, (4, 4), Fit("letterbox", 0.5)))
    band = [128, 128, 128, 128]  # 0.5 × 255 = 127.5, rounded half to even
    assert boxed.tolist() == [band, [10, 20, 30, 40], [50, 60, 70, 80], band]
    black = np.asarray(fit_image(grey, (4, 4), Fit("letterbox", 0.0)))
    assert black[[0, 3]].tolist() == [[0] * 4] * 2 and np.array_equal(black[1:3], PIXELS)


def test_letterbox_and_center_crop_of_a_file_as_loaded(tmp_path):
    rgb = np.stack([PIXELS, PIXELS + 1, PIXELS + 2], axis=2)  # 2×4×3, channels apart
    path = rgb_png(tmp_path / "wide.png", rgb)
    boxed = load_image(path, (4, 4), fit=Fit("letterbox", 0.2))
    fill = round(0.2 * 255) / 255  # 51/255
    expected = np.full((3, 4, 4), fill, dtype=np.float32)
    expected[:, 1:3] = rgb.transpose(2, 0, 1) / 255.0
    assert boxed.shape == (3, 4, 4) and np.array_equal(boxed, expected)
    # center-crop to 2×2: no scaling (the short side fits), the middle two columns kept
    cropped = load_image(path, (2, 2), fit=Fit("center-crop"))
    assert np.array_equal(cropped, rgb[:, 1:3].transpose(2, 0, 1) / np.float32(255.0))
    # scaled ×2: the centre 4×4 of the image stretched to 4×8; letterboxed to 6×8, the
    # stretched image between a row of fill above and below
    stretched = load_image(path, (4, 8))
    assert np.array_equal(load_image(path, (4, 4), fit=Fit("center-crop")), stretched[:, :, 2:6])
    tall = load_image(path, (6, 8), fit=Fit("letterbox", 0.0))
    assert np.array_equal(tall[:, 1:5], stretched) and not tall[:, [0, 5]].any()
    # stretch is the --size of before
    assert np.array_equal(load_image(path, (4, 4), fit=STRETCH), load_image(path, (4, 4)))


def test_the_resize_mode_enters_the_keys_the_size_enters(onnx_model, tmp_path):
    """The block cache keys the image as resized (its digest): each mode its own answers;
    the Ray journal keys (size, grayscale) and, beyond stretch, the mode and its fill."""
    assert Fit.of(ImageOptions(size="8x8")).key() == []  # journals made before stay valid
    assert Fit.of(ImageOptions(size="8x8", resize="letterbox")).key() == ["letterbox", 0.5]
    assert Fit.of(ImageOptions(size="8x8", resize="center-crop")).key() == ["center-crop"]
    wide = np.zeros((4, 8, 3), dtype=np.uint8)
    wide[:, 2:6] = 200  # a bright middle on black
    image = rgb_png(tmp_path / "wide.png", wide)
    base = ["certify", "-e", onnx_model, "--sigma", "0.25", "--n0", "10", "--n", "20"]
    base += ["--cache", str(tmp_path / "cache"), "--size", "8x8", image]
    seen = set()
    for mode in ("stretch", "letterbox", "center-crop", "letterbox"):
        result = run_cli(*base, "--resize", mode)
        assert result.returncode == 0, result.stderr
        sent = "0" if mode in seen else "30"  # a new mode: a new image, its own queries
        assert f"queries: {sent} sent" in result.stdout, (mode, result.stdout)
        seen.add(mode)


# -- one-line errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preset", "vgg"], "'vgg' is not one of 'imagenet', 'clip', 'caffe'"),
        (["--size", "4x4", "--resize", "fit"], "'fit' is not one of 'stretch'"),
        (["--resize", "letterbox"], "--resize letterbox says how to meet --size HxW: add --size"),
        (["--size", "4x4", "--fill", "0.2"], "--fill pads --resize letterbox"),
        (["--size", "4x4", "--resize", "letterbox", "--fill", "2"], "--fill must be a value"),
        (["--size", "4x4", "--resize", "letterbox", "--fill", "nan"], "--fill must be a value"),
        (["--preset", "imagenet", "@python"], "--preset describes a model's input tensor"),
        (["--preset", "caffe", "--input-dtype", "uint8"], "(and a --preset's) apply to fp32"),
    ],
)
def test_bad_presets_and_resizes_are_one_line_errors(flags, message, onnx_model, tmp_path):
    endpoint = onnx_model
    if "@python" in flags:
        flags = [f for f in flags if f != "@python"]
        (tmp_path / "f.py").write_text("def f(x):\n    return x.reshape(len(x), -1)[:, :3]\n")
        endpoint = f"python:{tmp_path / 'f.py'}:f"
    image = rgb_png(tmp_path / "grey.png", 0.5)
    result = run_cli("certify", "-e", endpoint, "--sigma", "0.25", *flags, image)
    err = result.stderr
    assert result.returncode == 2 and message in err and "Traceback" not in err, err
    assert len(messages(err)) == 1, err


# -- the convention hint --------------------------------------------------------------------


def test_the_hint_appears_once_for_a_model_that_wants_imagenet_values(torch_model, tmp_path):
    dark = [rgb_png(tmp_path / f"dark{i}.png", 0.1) for i in range(2)]
    base = ["certify", "-e", torch_model, "--sigma", "0.1", "--n0", "10", "--n", "20", *dark]
    plain = run_cli(*base)
    assert plain.returncode == 0, plain.stderr
    hints = [line for line in messages(plain.stderr) if HINT in line]
    name = torch_model
    assert hints == [
        f"bbsmooth: warning: {name} answers 0 on the clean image as given but 1 {HINT} "
        "(--preset, --input-mean, --input-std)"
    ], plain.stderr
    told = run_cli(*base, "--preset", "imagenet")
    assert told.returncode == 0 and HINT not in told.stderr, told.stderr
    predicted = run_cli("predict", "-e", torch_model, "--sigma", "0.1", "--n", "20", dark[0])
    assert predicted.returncode == 0 and predicted.stderr.count(HINT) == 1, predicted.stderr


def test_the_hint_is_silent_where_both_conventions_agree_or_it_cannot_tell(
    onnx_model, capsys, tmp_path
):
    box = open_blackbox(onnx_model)
    bright, dark = np.full((3, 8, 8), 0.9, np.float32), np.full((3, 8, 8), 0.1, np.float32)
    convention_hint(onnx_model, EndpointOptions(), box, [bright])  # 0 either way
    convention_hint(onnx_model, EndpointOptions(), box, [dark[:1]])  # grey: no ImageNet mean
    convention_hint(onnx_model, EndpointOptions(input_std="0.5"), box, [dark])  # declared
    convention_hint(onnx_model, EndpointOptions(), box, [])
    assert capsys.readouterr().err == ""
    convention_hint(onnx_model, EndpointOptions(), box, [dark])  # an onnx: model too
    assert HINT in capsys.readouterr().err
    assert box.input == ModelInput.of(EndpointOptions(), box.input.layout, box.input.dtype)
