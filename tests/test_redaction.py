"""Keys never leave in any form, whatever the server does with them; what identifies an
endpoint in the cache is all that can change its answers and never a credential."""

from __future__ import annotations

import html
import json
import string
from urllib.parse import quote, quote_plus

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blackbox_smooth import redaction
from blackbox_smooth.adapters import EndpointOptions, open_blackbox
from blackbox_smooth.adapters.auth import Auth, read_key
from blackbox_smooth.adapters.retry import is_retryable
from blackbox_smooth.adapters.urls import identity_url
from blackbox_smooth.errors import UsageError
from blackbox_smooth.redaction import KGRAM, printable, redact, server_text

KEY_CHARS = string.ascii_letters + string.digits + "-_./+=~!$&'()*,;:@%\"<>\\"
keys = st.text(alphabet=KEY_CHARS, min_size=KGRAM, max_size=64)
filler = st.text(alphabet=string.printable + "é漢\u202e\x1b", max_size=300)
forms = st.sampled_from([
    lambda k: k,
    lambda k: json.dumps(k)[1:-1],
    lambda k: repr(k)[1:-1],
    lambda k: html.escape(k),
    lambda k: quote(k, safe=""),
    lambda k: quote_plus(k, safe=""),
    lambda k: quote(k, safe="").lower(),
    lambda k: k.upper(),
])  # fmt: skip


def pieces(text: str, key: str) -> list[str]:
    """Runs of KGRAM characters of the key in `text`, ASCII case ignored."""
    low = text.lower()
    return [
        key[i : i + KGRAM] for i in range(len(key) - KGRAM + 1) if key[i : i + KGRAM].lower() in low
    ]


@settings(max_examples=300, deadline=None)
@given(key=keys, before=filler, after=filler, form=forms, cut=st.integers(0, 700),
       partial=st.integers(KGRAM, 64))  # fmt: skip
def test_no_piece_of_a_key_survives_redaction_and_any_cut(key, before, after, form, cut, partial):
    echoed = form(key)
    for shown in (echoed, echoed[:partial], echoed[-partial:]):  # the server echoes part of it
        text = before + shown + after
        out = redact(text, [key])
        assert not pieces(out[:cut], key)
        assert not pieces(out, key)


@settings(max_examples=200, deadline=None)
@given(key=keys, before=filler, after=filler, form=forms, limit=st.integers(1, 400))
def test_server_text_redacts_before_it_shortens(key, before, after, form, limit):
    known = redaction.secrets()
    redaction.remember(key)
    try:
        out = server_text(before + form(key) + after, limit)
    finally:  # a drawn key must not redact the rest of the suite's messages (it may be any text)
        redaction._SECRETS[:] = known
    assert not pieces(out, key)
    assert len(out) <= max(limit, 1)
    assert not any(ord(c) < 32 or c in "\x7f\u202e" for c in out)


def test_text_without_the_key_is_left_alone_and_short_keys_match_whole():
    assert redact("nothing to see here", ["sk-abcdefgh12345"]) == "nothing to see here"
    assert redact("the key abc1 and abc", ["abc1"]) == "the key *** and abc"
    assert printable("a\x1b[2Jb\tc\n\nd\u202ee", 100) == "a[2Jb c de"
    assert printable("x" * 50, 10) == "x" * 9 + "…"
    assert (
        server_text(["a"] * 3) == "<list of 3>" and server_text(10**30) == "<a very large integer>"
    )


@pytest.mark.parametrize("value", ["abc\r", "abc\n", "ab c", "\tabc", "abcé", "abc\x7f"])
def test_a_key_with_whitespace_or_control_characters_is_refused_naming_only_the_variable(
    value, monkeypatch
):
    monkeypatch.setenv("MY_KEY", value)
    with pytest.raises(UsageError) as e:
        read_key("MY_KEY")
    assert "$MY_KEY" in str(e.value) and value.strip() not in str(e.value)


def test_client_side_protocol_errors_are_not_retried():
    assert not is_retryable(httpx.LocalProtocolError("Illegal header value"))
    assert is_retryable(httpx.ConnectError("refused"))


def test_the_query_string_is_part_of_the_identity_and_credentials_are_not(monkeypatch):
    monkeypatch.setenv("K", "s3cr3t-value-123")
    auth = Auth("query:sig2", "K")
    a = identity_url("https://h.example/v2/models/m/infer?model=a&api-version=2", auth)
    b = identity_url("https://h.example/v2/models/m/infer?api-version=2&model=b", auth)
    assert a != b and "model=a" in a and "api-version=2" in a
    same = identity_url("https://h.example/p?b=2&a=1&key=x&Api-Key=y&sig2=z&token=t", auth)
    assert same == "https://h.example/p?a=1&b=2"
    hidden = identity_url("https://h.example/p?mine=s3cr3t-value-123&x=1", auth)
    assert hidden == "https://h.example/p?x=1"
    assert identity_url("http://u:p@h.example:8080/p") == "http://h.example:8080/p"


@pytest.mark.slow  # seconds of work in process: in make test, not test-fast
def test_two_models_behind_one_url_never_share_a_fingerprint():
    options = EndpointOptions(input_layout="nchw", input_dtype="fp32", input_name="input-0")
    a = open_blackbox("http://127.0.0.1:9/v2/models/m/infer?model=a", options)
    b = open_blackbox("http://127.0.0.1:9/v2/models/m/infer?model=b", options)
    c = open_blackbox("http://127.0.0.1:9/v2/models/m/infer?model=a&key=zzz", options)
    assert a.fingerprint != b.fingerprint and a.fingerprint == c.fingerprint


def test_a_key_sent_in_clear_to_another_machine_is_warned_about(monkeypatch, capsys):
    monkeypatch.setenv("BBSMOOTH_API_KEY", "hf_0123456789abcdef")
    open_blackbox("http://models.example.com/predictions/m")
    err = capsys.readouterr().err
    assert "warning" in err and "unencrypted" in err and "0123456789" not in err
    open_blackbox("http://127.0.0.1:9/predictions/m")
    open_blackbox("https://models.example.com/predictions/m")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("style", ["header:Host", "header:Content-Length", "header:Proxy-Auth",
                                   "header:bad name", "query:a b", "header:"])  # fmt: skip
def test_auth_styles_that_would_smuggle_a_header_are_refused(style):
    with pytest.raises(UsageError):
        Auth(style, "UNSET_VARIABLE_FOR_TEST")
