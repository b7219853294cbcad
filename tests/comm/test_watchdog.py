"""The watchdog that bounds device work Piper does not wait for (csrc/runtime/watchdog.hpp:
NCCL groups on a CUDA stream, aborted with ncclCommAbort when late). Its protocol, through the
test probe _C.WatchdogProbe whose tokens are integers the test completes by hand: completed
work is released and never expires, late work expires once with a message naming it and its
age, every token is released exactly once, stop() neither waits for the limit nor expires, and
a hook that throws ends the watching, not the process."""

import random
import time

import pytest

from piper_comm import _C


def wait_until(cond, limit=10.0):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_completed_work_is_released_and_never_expires():
    w = _C.WatchdogProbe(timeout_s=3.0, poll_s=0.01)
    for t in range(5):
        w.watch(t, f"group {t}")
    for t in range(5):
        w.complete(t)
    assert wait_until(lambda: w.watched == 0), w.released()
    assert sorted(w.released()) == list(range(5))
    time.sleep(3.5)  # past the limit: nothing is left to expire
    assert not w.expired and w.reason == "" and w.expiries() == []
    w.stop()
    assert sorted(w.released()) == list(range(5))


def test_late_work_expires_once_naming_it_and_its_age():
    w = _C.WatchdogProbe(timeout_s=0.4, poll_s=0.01)
    t0 = time.monotonic()
    w.watch(1, "NCCL group 1 of 2 messages (8 B sent, 8 B received; peers 1)")
    w.watch(2, "NCCL group 2 of 2 messages (8 B sent, 8 B received; peers 1)")
    w.complete(1)
    assert wait_until(lambda: w.expired)
    waited = time.monotonic() - t0
    assert 0.4 <= waited < 5.0, waited
    # expired is set before the hooks run: wait for them
    assert wait_until(lambda: w.expiries() and sorted(w.released()) == [1, 2]), w.released()
    assert w.expiries() == [w.reason]
    assert w.reason.startswith("NCCL group 2 of 2 messages (8 B sent, 8 B received; peers 1): "
                               "not completed "), w.reason
    assert w.reason.endswith(" s after it was handed off (limit 0.4 s)"), w.reason
    age = float(w.reason.split("not completed ")[1].split(" s")[0])
    assert age >= 0.4, w.reason
    assert sorted(w.released()) == [1, 2]  # every token, the late one too
    w.watch(3, "after the expiry")  # not watched: released at once, never expired again
    assert sorted(w.released()) == [1, 2, 3] and w.watched == 0
    time.sleep(0.6)
    assert len(w.expiries()) == 1
    w.stop()


def test_each_item_has_its_own_age():
    """An item watched later than a completed one is timed from its own hand-off."""
    w = _C.WatchdogProbe(timeout_s=3.0, poll_s=0.01)
    w.watch(1, "first")
    time.sleep(2.0)
    w.complete(1)
    t_second = time.monotonic()
    w.watch(2, "second")
    assert wait_until(lambda: w.expired)
    assert time.monotonic() - t_second >= 3.0
    assert w.reason.startswith("second: "), w.reason
    w.stop()


def test_stop_releases_pending_work_without_waiting_or_expiring():
    w = _C.WatchdogProbe(timeout_s=30.0, poll_s=0.01)
    for t in range(3):
        w.watch(t, f"group {t}")
    t0 = time.monotonic()
    w.stop()
    assert time.monotonic() - t0 < 2.0
    assert not w.expired and sorted(w.released()) == [0, 1, 2] and w.watched == 0
    w.watch(7, "after stop")
    assert sorted(w.released()) == [0, 1, 2, 7]
    w.stop()  # idempotent
    assert sorted(w.released()) == [0, 1, 2, 7]


def test_a_failing_hook_ends_the_watching_without_ending_the_process():
    w = _C.WatchdogProbe(timeout_s=30.0, poll_s=0.01)
    w.watch(1, "group 1")
    w.fail(2)
    w.watch(2, "group 2")
    assert wait_until(lambda: sorted(w.released()) == [1, 2]), w.released()
    assert w.reason == "the watchdog stopped: the probe's done hook failed on purpose"
    assert not w.expired and w.expiries() == []
    w.watch(3, "after the failure")  # released at once
    assert sorted(w.released()) == [1, 2, 3] and w.watched == 0
    w.stop()


@pytest.mark.parametrize("seed", [0, 1])
def test_many_tokens_completed_in_any_order_are_released_exactly_once(seed):
    rng = random.Random(seed)
    w = _C.WatchdogProbe(timeout_s=20.0, poll_s=0.001)
    tokens = list(range(2000))
    open_ = []
    for t in tokens:
        w.watch(t, f"group {t}")
        open_.append(t)
        if rng.random() < 0.5:
            w.complete(open_.pop(rng.randrange(len(open_))))
    for t in open_:
        w.complete(t)
    assert wait_until(lambda: w.watched == 0), w.watched
    w.stop()
    assert sorted(w.released()) == tokens
    assert not w.expired


def test_a_watched_groups_summary_names_bytes_and_distinct_peers():
    """csrc/runtime/message_summary.hpp, the line a watched NCCL group is named by: bytes each
    way, the peers of non-empty messages once each in order of appearance, at most 8 named."""
    msgs = [(True, 3, 100), (False, 3, 50), (True, 1, 0), (False, 1, 7), (True, 1, 8)]
    assert _C.summarize_messages(msgs) == "5 messages (108 B sent, 57 B received; peers 3, 1)"
    assert _C.summarize_messages([]) == "0 messages (0 B sent, 0 B received; peers )"
    flat = [(send, p, 4) for p in range(1000) for send in (True, False)]  # 2P messages
    line = _C.summarize_messages(flat)
    assert line == ("2000 messages (4000 B sent, 4000 B received; "
                    "peers 0, 1, 2, 3, 4, 5, 6, 7, ... (1000 peers))"), line
    # take() starts a new batch: the same summary object used again gives the same line
    assert _C.summarize_messages(msgs, repeat=3) == _C.summarize_messages(msgs)
