"""The local gateway's X-Callback-Url allow-list and its queue's de-duplication key."""

import pytest

from faasci.local import queue
from faasci.local.gateway import callback_allow_list, callback_allowed

GW = "http://127.0.0.1:8080"
DEFAULT = callback_allow_list(GW, env={})


def test_default_allows_only_this_gateways_functions():
    assert callback_allow_list(GW, env={}) == [f"{GW}/function/"]
    assert callback_allowed(f"{GW}/function/notifier", DEFAULT)
    assert callback_allowed("http://127.0.0.1:8080/function/x/y?z=1", DEFAULT)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/done",  # another port
        "http://localhost:8080/function/unit",  # another host name
        "http://169.254.169.254/latest/meta-data/",
        f"{GW}/async-function/unit",
        f"{GW}/system/functions",
        f"{GW}/function/../system/functions",  # dot segments
        f"{GW}/function/%2e%2e/system/functions",  # escaped
        "http://127.0.0.1:8080@evil.example/function/unit",  # user info
        "http://user:pw@127.0.0.1:8080/function/unit",
        "https://127.0.0.1:8080/function/unit",  # another scheme
        "http://127.0.0.1:8080/functionx/unit",
        "http://127.0.0.1:notaport/function/unit",
        "file:///etc/passwd",
        "",
    ],
)
def test_everything_else_is_refused(url):
    assert not callback_allowed(url, DEFAULT)


def test_configured_prefixes_and_none():
    allowed = callback_allow_list(
        GW, env={"FAASCI_CALLBACK_ALLOW": "https://ci.example.com/hooks/ http://10.0.0.5:9000/"}
    )
    assert callback_allowed("https://ci.example.com/hooks/done", allowed)
    assert callback_allowed("https://ci.example.com:443/hooks/done", allowed)
    assert callback_allowed("http://10.0.0.5:9000/x", allowed)
    assert not callback_allowed("https://ci.example.com/other", allowed)
    assert not callback_allowed(f"{GW}/function/unit", allowed)
    nothing = callback_allow_list(GW, env={"FAASCI_CALLBACK_ALLOW": ""})
    assert nothing == [] and not callback_allowed(f"{GW}/function/unit", nothing)


def message(call_id="r.integration.1", body=b'{"run_id": "r", "attempt": 1}', **headers):
    return queue.request_message("integration", "", "POST", "", headers, body, call_id, None)


def test_the_dedup_key_is_not_the_call_id():
    signed = {"X-Faasci-Signature": "t=1,fn=unit,v1=ab"}
    real = message(**signed)
    assert queue.dedup_id(real) == queue.dedup_id(message(**signed))  # a true duplicate
    assert queue.dedup_id(real) != real["call_id"]
    # the same call id from a client: another body, or the same body without the signature
    assert queue.dedup_id(message(body=b"{}")) != queue.dedup_id(real)
    assert queue.dedup_id(message()) != queue.dedup_id(real)
    assert queue.dedup_id(message(Authorization="Bearer x")) != queue.dedup_id(real)
    assert queue.dedup_id(message(call_id="r.integration.2", **signed)) != queue.dedup_id(real)
