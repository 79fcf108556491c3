"""faasci.masking: every form of a secret a command could print is masked, in text, in a
file of any size, and in the function process's own log."""

import base64
import io
import json
import logging
import re
from urllib.parse import quote, quote_plus

import pytest

from faasci import masking
from faasci.masking import MASK, Masker, Unmaskable

SECRET = "s3cr3t-Value/with+odd&chars=ok?"


def encodings(value: str) -> dict[str, str]:
    raw = value.encode()
    return {
        "plain": value,
        "b64": base64.b64encode(raw).decode(),
        "b64-urlsafe": base64.urlsafe_b64encode(raw).decode(),
        "b64-unpadded": base64.b64encode(raw).decode().rstrip("="),
        "url": quote(value, safe=""),
        "url-path": quote(value),
        "url-plus": quote_plus(value),
        "url-lower-escapes": re.sub("%[0-9A-F]{2}", lambda m: m[0].lower(), quote(value, safe="")),
    }


@pytest.mark.parametrize("form", list(encodings(SECRET)))
def test_every_form_alone_and_inside_a_line_is_masked(form):
    text = encodings(SECRET)[form]
    masker = Masker([SECRET])
    for line in (text, f"before {text} after", f"x={text}\n", f'{{"k": "{text}"}}'):
        masked = masker.text(line)
        assert text not in masked and MASK in masked, (form, line, masked)


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc", "user:", "Basic "])
@pytest.mark.parametrize("suffix", ["", "\n", "x", "xy", "-tail"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_of_longer_text_holding_the_secret_at_any_alignment(prefix, suffix, encode):
    """`echo "$S" | base64`, a basic-auth header, a JSON blob: the secret's bytes anywhere."""
    encoded = encode(f"{prefix}{SECRET}{suffix}".encode()).decode()
    masked = Masker([SECRET]).text(f"out: {encoded} end")
    assert MASK in masked
    # What is left of the encoding cannot give the secret back, decoded at any offset.
    for left in masked.split():
        for start in range(4):
            chunk = left[start:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            try:
                decoded = base64.b64decode(chunk.replace("-", "+").replace("_", "/"))
            except ValueError:
                continue
            assert SECRET[:8].encode() not in decoded and SECRET[-8:].encode() not in decoded


def test_a_multiline_secret_is_masked_whole_and_line_by_line():
    key = "-----BEGIN KEY-----\nMIIabcdefghijkl\nmnopqrstuvwxyz12\n-----END KEY-----\n"
    masker = Masker([key])
    assert key.strip() not in masker.text(f"cat: {key}")
    for line in key.splitlines():
        assert line not in masker.text(f"line: {line}\n")


def test_values_too_short_to_mask_are_refused():
    with pytest.raises(Unmaskable, match="PIN"):
        Masker.strict({"PIN": "123"})
    with pytest.raises(Unmaskable):
        Masker.strict({"X": "  ab \n"})
    assert Masker.strict({"OK": "abcd"}).text("xabcdx") == f"x{MASK}x"


def test_nothing_else_is_touched():
    masker = Masker([SECRET])
    text = "an ordinary line with base64 aGVsbG8gd29ybGQ= and 100% of %41 escapes\n"
    assert masker.text(text) == text
    assert Masker().text(text) == text


def test_json_values_are_masked_inside_records():
    record = {"error": f"failed: {SECRET}", "tail": [SECRET, 3], "n": None}
    masked = Masker([SECRET]).json(record)
    assert SECRET not in json.dumps(masked)
    assert masked["n"] is None and masked["tail"][1] == 3


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_a_file_is_masked_in_place_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(masking, "CHUNK", chunk)
    forms = list(encodings(SECRET).values())
    lines = [f"line {i}: {forms[i % len(forms)]} done\n" for i in range(300)]
    log = tmp_path / "stage.log"
    log.write_text("".join(lines))
    Masker([SECRET]).file(log)
    text = log.read_text()
    assert text.count(MASK) >= 300
    for form in forms:
        assert form not in text
    assert text.count("\n") == 300 and text.startswith("line 0: ***")


def test_the_process_log_filter_masks_registered_and_platform_secrets(tmp_path, monkeypatch):
    from faasci import settings

    (tmp_path / "s3-secret-key").write_text("platform-s3-secret-value\n")
    monkeypatch.setattr(settings, "_current", settings.Settings(secrets_dir=tmp_path))
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test-masking")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        masking.install_filter(logger)
        handle = masking.register(Masker([SECRET]))
        try:
            logger.warning("stage said %s", SECRET)
            logger.warning("s3 key platform-s3-secret-value leaked?")
            try:
                raise RuntimeError(f"boom {base64.b64encode(SECRET.encode()).decode()}")
            except RuntimeError:
                logger.exception("failed")
        finally:
            masking.unregister(handle)
        logger.warning("after: %s", SECRET)  # no longer a running stage's
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert out.count(MASK) == 3
    assert "platform-s3-secret-value" not in out
    assert base64.b64encode(SECRET.encode()).decode() not in out
    assert f"after: {SECRET}" in out
