"""Live, bounded logs in the real S3: LiveLog's parts (masked, the head kept, a sliding tail),
the final log (head, a cut line, tail), and a follower going on in the final object."""

import contextlib
import secrets
import threading
import time

import pytest

from faasci import logs
from faasci.errors import NotFound
from faasci.masking import Masker


@pytest.fixture
def store(client_settings):
    """The test stack's real S3, as the functions reach it."""
    from faasci import services

    return services.objects()


@pytest.fixture
def key():
    """A log key of its own (a run id no other test uses)."""
    return f"logs/20260101-000000-{secrets.token_hex(3)}/unit/1.log"


def parts_of(store, key):
    """The log's parts in S3 now: one the writer drops (its tail sliding on) between the
    listing and the read is no longer there, and not counted."""
    found = {}
    for k in store.keys(logs.part_prefix(key)):
        with contextlib.suppress(NotFound):
            found[k] = b"".join(store.stream(k))
    return found


def test_max_bytes_reads_sizes_with_suffixes():
    assert logs.max_bytes({}) == logs.MAX_BYTES == 100 * 2**20
    assert logs.max_bytes({"FAASCI_LOG_MAX_BYTES": "400M"}) == 400 * 2**20
    assert logs.max_bytes({"FAASCI_LOG_MAX_BYTES": "2GiB"}) == 2 * 2**30
    assert logs.max_bytes({"FAASCI_LOG_MAX_BYTES": "123456"}) == 123456
    assert logs.max_bytes({"FAASCI_LOG_MAX_BYTES": "1"}) == 64 * 1024  # a floor
    assert logs.max_bytes({"FAASCI_LOG_MAX_BYTES": "lots"}) == logs.MAX_BYTES


def test_parts_stream_while_written_and_the_final_log_is_whole(store, key, tmp_path):
    path = tmp_path / "stage.log"
    live = logs.LiveLog(path, key, Masker(["s3cr3t-value"]), cap=2**20, store=store,
                        flush_s=0.05)  # fmt: skip
    with path.open("wb") as out, live:
        out.write(b"first line\n" * 10 + b"then s3cr3t-")
        out.flush()
        time.sleep(0.3)
        # uploaded while running, but for the few bytes a secret could still start in
        assert b"".join(parts_of(store, key).values()).startswith(b"first line\n" * 8)
        out.write(b"value inside\nsecond\n")  # the secret spans two rounds: masked still
        out.flush()
        time.sleep(0.3)
    final = live.finish()
    assert final.read_bytes() == b"first line\n" * 10 + b"then *** inside\nsecond\n"
    assert b"s3cr3t" not in b"".join(parts_of(store, key).values())
    assert live.tail.endswith("second\n")
    assert live.metadata()["head"] == str(len(final.read_bytes()))
    store.put_file(key, final, metadata=live.metadata())
    logs.discard_parts(key, store)
    assert parts_of(store, key) == {}


def test_a_log_over_its_cap_keeps_head_and_tail_and_says_what_was_cut(store, key, tmp_path):
    path = tmp_path / "stage.log"
    cap = 256 * 1024
    live = logs.LiveLog(path, key, Masker(), cap=cap, store=store, flush_s=0.02)
    lines = [f"line {i:07d}\n".encode() for i in range(200_000)]  # 2.6 MB
    with path.open("wb") as out, live:
        for i in range(0, len(lines), 20_000):
            out.write(b"".join(lines[i : i + 20_000]))
            out.flush()
            time.sleep(0.03)
        # the parts in S3 stay within the cap (the head, the tail and one part's slack)
        assert sum(map(len, parts_of(store, key).values())) <= cap + logs.PART_MAX
    final = live.finish().read_bytes()
    head, _, rest = final.partition(b"\n[faas-ci] \xe2\x80\xa6 ")
    cut = int(rest.split(b" ")[0])
    marker_end = rest.index(b"\n") + 1
    tail = rest[marker_end:]
    assert head == b"".join(lines)[: cap // 2]
    assert len(tail) <= cap - cap // 2 and tail.endswith(b"line 0199999\n")
    assert b"".join(lines).endswith(tail)
    assert len(head) + cut + len(tail) == len(b"".join(lines))
    assert f"{cut} bytes cut".encode() in final and b"FAASCI_LOG_MAX_BYTES" in final
    assert live.tail.endswith("line 0199999\n")
    # served from the parts (a lost attempt's log): the same head, a cut line, the tail
    served = b"".join(logs.join_parts(
        logs._parts(store, key), lambda o, skip: store.stream(logs.part_key(key, o), skip),
        cap // 2, cap - cap // 2, cap))  # fmt: skip
    assert served.startswith(head) and served.endswith(tail) and b"bytes cut" in served


def test_output_that_would_only_slide_out_is_never_read(store, key, tmp_path):
    """A burst far over the cap between two rounds: the reading jumps to the tail."""
    path = tmp_path / "stage.log"
    cap = 128 * 1024
    live = logs.LiveLog(path, key, Masker(), cap=cap, store=store, flush_s=3600)
    path.write_bytes(b"x" * 100 + b"\n" + b"y\n" * 4 * logs.PART_MAX)
    live._pump(final=True)
    assert live.read_at == path.stat().st_size
    assert sum(live.parts.values()) <= cap  # only the head and the last tail_max read
    final = live.finish().read_bytes()
    assert final.startswith(b"x" * 100 + b"\n") and b"bytes cut" in final
    assert len(final) < cap + 300


@pytest.mark.parametrize("cut", [False, True])
def test_a_follower_goes_on_in_the_final_object_where_the_parts_left_off(store, key, tmp_path, cut):
    path = tmp_path / "stage.log"
    cap = 64 * 1024
    live = logs.LiveLog(path, key, Masker(), cap=cap, store=store, flush_s=0.02)
    body = b"".join(f"{i:09d}\n".encode() for i in range(30_000 if cut else 3000))
    got, running = [], threading.Event()
    running.set()
    follower = threading.Thread(target=lambda: got.extend(logs.follow_log(
        store, key, running.is_set, poll_s=0.02)))  # fmt: skip
    follower.start()
    with path.open("wb") as out, live:
        for i in range(0, len(body), 50_000):
            out.write(body[i : i + 50_000])
            out.flush()
            time.sleep(0.05)
    final = live.finish()
    store.put_file(key, final, metadata=live.metadata())
    logs.discard_parts(key, store)
    running.clear()
    follower.join(10)
    followed = b"".join(got)
    if not cut:
        assert followed == body == final.read_bytes()
    else:  # the head, then all it kept up with (a cut line for what slid out), the end
        assert followed.startswith(body[: cap // 2]) and followed.endswith(body[-1000:])
        assert followed == body or b"bytes cut" in followed
        assert b"bytes cut" in final.read_bytes()


def test_a_follower_of_a_lost_attempt_ends_with_its_partial_log(store, key, tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "FLUSH_S", 0.01)
    path = tmp_path / "stage.log"
    path.write_bytes(b"started\n")
    live = logs.LiveLog(path, key, Masker(), store=store)
    live._pump()
    live._upload()  # its worker dies: no final object, ever
    followed = b"".join(logs.follow_log(store, key, lambda: False, poll_s=0.01))
    assert followed.startswith(b"started\n") and b"without a final log" in followed


def test_final_offset_maps_a_followers_place():
    meta = {"head": "100", "tail-from": "1000", "tail-at": "180"}
    assert logs.final_offset(meta, 50) == 50  # in the head
    assert logs.final_offset(meta, 500) == 100  # in the cut: the cut line next
    assert logs.final_offset(meta, 1200) == 380  # in the tail
    assert logs.final_offset({}, 77) == 77  # a log stored before these fields
