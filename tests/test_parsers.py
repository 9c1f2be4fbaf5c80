"""Property-based: every adapter's response parser, fed arbitrary JSON and bytes, returns a
valid answer or raises the project's ProtocolError (or, for an error the vendor reports about
the request itself, another one-line project error) — never anything else."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blackbox_smooth.adapters import gcv, huggingface, torchserve
from blackbox_smooth.adapters.generic import Generic, VendorConfig
from blackbox_smooth.adapters.http import HttpTransport, parse_json_body
from blackbox_smooth.adapters.kserve import KServe, KServeOptions
from blackbox_smooth.adapters.labels import LabelMap
from blackbox_smooth.blackbox import OTHER, Answer
from blackbox_smooth.errors import BBSmoothError, ProtocolError

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)
label_lists = st.lists(
    st.fixed_dictionaries({"label": st.text(max_size=6) | st.integers(), "score": st.floats()}),
    max_size=4,
)
kserve_like = st.fixed_dictionaries(
    {
        "outputs": st.lists(
            st.fixed_dictionaries(
                {
                    "name": st.text(max_size=4),
                    "datatype": st.sampled_from(["FP32", "INT64", "BYTES", "BOOL", "x"]),
                    "shape": st.lists(st.integers(-1, 4), max_size=3),
                    "data": st.lists(
                        st.floats() | st.integers() | st.text(max_size=2), max_size=12
                    ),
                }
            ),
            max_size=2,
        )
    }
)
anything = json_values | label_lists | kserve_like
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid(answer: Answer, n: int) -> None:
    assert isinstance(answer, Answer) and answer.labels.shape == (n,)
    assert answer.labels.dtype == np.int64 and np.all(answer.labels >= OTHER)
    if answer.scores is not None:
        assert answer.scores.shape[0] == n and np.all(np.isfinite(answer.scores))


def pairs_ok(pairs) -> None:
    for label, score in pairs:
        assert isinstance(label, str) and isinstance(score, float) and np.isfinite(score)


KSERVE = KServe(
    "http://h/v2/models/m/infer", HttpTransport(), KServeOptions("nchw", "fp32", None, "input-0")
)
MAPPING = LabelMap.from_pairs([("cat", "cat"), ("dog", "dog"), ("3", "cat")], "test")


@SETTINGS
@given(anything, st.integers(1, 4))
def test_kserve_parser(body, n):
    with contextlib.suppress(ProtocolError):
        valid(KSERVE.parse(body, n), n)


@SETTINGS
@given(anything)
def test_huggingface_and_torchserve_parsers(body):
    for parse in (huggingface.parse, torchserve.parse):
        try:
            pairs = parse(body)
        except ProtocolError:
            continue
        pairs_ok(pairs)
        valid(MAPPING.answer([pairs], "test"), 1)


@SETTINGS
@given(
    anything | st.fixed_dictionaries({"responses": st.lists(anything, max_size=3)}),
    st.integers(1, 3),
)
def test_cloud_vision_parser(body, n):
    try:
        answers = gcv.parse(body, n)
    except BBSmoothError:  # ProtocolError, or a per-image error the vendor reports (one line)
        return
    assert len(answers) == n
    for pairs in answers:
        pairs_ok(pairs)


@SETTINGS
@given(anything)
def test_generic_parser_with_both_example_configs(body):
    for config in (
        VendorConfig(labels="tagsResult.values[*].name", scores="tagsResult.values[*].confidence"),
        VendorConfig(
            labels="outputs[0].data.concepts[*].name",
            status="status.code",
            ok=[10000],
            retry=[11005],
            message="status.description",
        ),  # fmt: skip
    ):
        adapter = Generic.__new__(Generic)
        adapter.config = config
        try:
            pairs = adapter.parse(body)
        except BBSmoothError:
            continue
        pairs_ok(pairs)


@SETTINGS
@given(st.binary(max_size=64))
def test_arbitrary_bytes_are_json_or_a_protocol_error(raw):
    with contextlib.suppress(ProtocolError):
        parse_json_body(raw)


# The properties above would pass if every input raised: these answers, well formed as each
# vendor documents them, must parse, to the labels and scores they carry.
finite = st.floats(-1e6, 1e6, allow_nan=False)
names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=6)
scored = st.lists(st.tuples(names, finite), min_size=1, max_size=5)


@SETTINGS
@given(st.integers(1, 4), st.integers(2, 5), st.data())
def test_kserve_parser_reads_well_formed_scores(n, classes, data):
    scores = data.draw(st.lists(finite, min_size=n * classes, max_size=n * classes))
    body = {"outputs": [{"name": "o", "datatype": "FP32", "shape": [n, classes], "data": scores}]}
    answer = KSERVE.parse(body, n)
    valid(answer, n)
    expected = np.asarray(scores, dtype=np.float32).reshape(n, classes).argmax(1)
    assert answer.labels.tolist() == expected.tolist()


@SETTINGS
@given(scored)
def test_huggingface_and_torchserve_parsers_read_well_formed_answers(pairs):
    as_list = [{"label": label, "score": score} for label, score in pairs]
    assert [(a, pytest.approx(b)) for a, b in huggingface.parse(as_list)] == pairs
    as_dict = dict(pairs)
    assert dict(torchserve.parse(as_dict)) == pytest.approx(as_dict)


@SETTINGS
@given(st.lists(scored, min_size=1, max_size=3))
def test_cloud_vision_parser_reads_well_formed_answers(images):
    body = {"responses": [{"labelAnnotations": [{"description": d, "score": s} for d, s in pairs]}
                          for pairs in images]}  # fmt: skip
    answers = gcv.parse(body, len(images))
    assert [[label for label, _ in pairs] for pairs in answers] == [
        [label for label, _ in pairs] for pairs in images
    ]


@SETTINGS
@given(scored)
def test_generic_parser_reads_well_formed_answers(pairs):
    adapter = Generic.__new__(Generic)
    adapter.config = VendorConfig(
        labels="tagsResult.values[*].name", scores="tagsResult.values[*].confidence"
    )
    body = {"tagsResult": {"values": [{"name": n, "confidence": s} for n, s in pairs]}}
    assert [label for label, _ in adapter.parse(body)] == [label for label, _ in pairs]
    adapter.config = VendorConfig(labels="outputs[0].data.concepts[*].name", status="status.code",
                                  ok=[10000], retry=[11005], message="status.description")  # fmt: skip
    concepts = [{"name": n} for n, _ in pairs]
    body = {"status": {"code": 10000}, "outputs": [{"data": {"concepts": concepts}}]}
    assert [label for label, _ in adapter.parse(body)] == [label for label, _ in pairs]


@SETTINGS
@given(json_values)
def test_json_bytes_parse_to_what_they_hold(value):
    raw = json.dumps(value, allow_nan=False).encode() if _finite(value) else b"null"
    assert parse_json_body(raw) == json.loads(raw)


def _finite(value) -> bool:
    """JSON that orjson reads as json does: finite floats, integers within 64 bits."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(2**63) <= value < 2**64
    if isinstance(value, float):
        return np.isfinite(value)
    if isinstance(value, list):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True
