"""The egress guard's test matrix: what may and may not leave a client."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.wire import ARRAYS, METRICS, REFUSAL, EgressGuard, EgressViolation, Reason, WireSchema, message_config_violation, refusal_content

SCHEMA = WireSchema({"global/layers.0.q.lora_A": (2, 3), "global/layers.0.q.lora_B": (3, 2)})
SECRET = "Jane Doe, 555-0100, jane@example.com"


def good_arrays(**overrides):
    arrays = {k: np.zeros(s, dtype=np.float32) for k, s in SCHEMA.arrays.items()}
    arrays.update(overrides)
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def train_reply(arrays=None, **extra):
    content = {ARRAYS: arrays or good_arrays()}
    content.update(extra)
    return RecordDict(content)


def test_valid_train_evaluate_and_refusal_replies_pass():
    guard = EgressGuard(SCHEMA)
    guard.check(train_reply(), "train")
    guard.check(RecordDict({METRICS: MetricRecord({})}), "evaluate")
    for kind in ("train", "evaluate", "query"):
        guard.check(refusal_content(Reason.DP_REQUIRED), kind)


CASES = {
    "document string in a ConfigRecord": lambda: train_reply(config=ConfigRecord({"doc": SECRET})),
    "PII string as a config value under an allowed record name": lambda: RecordDict(
        {ARRAYS: good_arrays(), METRICS: ConfigRecord({"train-loss": SECRET})}
    ),
    "any metrics on a train reply": lambda: train_reply(metrics=MetricRecord({"train-loss": 1.0, "num-examples": 3})),
    "PII as a metric name": lambda: train_reply(metrics=MetricRecord({SECRET: 1.0})),
    "a refusal with text": lambda: RecordDict({REFUSAL: ConfigRecord({"reason": SECRET})}),
    "a refusal with an extra field": lambda: RecordDict({REFUSAL: MetricRecord({"reason": 5, "detail": 1.0})}),
    "a refusal with an unknown code": lambda: RecordDict({REFUSAL: MetricRecord({"reason": 12345})}),
    "a refusal beside arrays": lambda: RecordDict({REFUSAL: MetricRecord({"reason": 5}), ARRAYS: good_arrays()}),
    "unexpected tensor": lambda: train_reply(
        arrays=good_arrays(**{"user/layers.0.q.lora_A": np.zeros((2, 3), np.float32)})
    ),
    "tensor under a PII-shaped name": lambda: train_reply(arrays=good_arrays(**{SECRET: np.zeros(1, np.float32)})),
    "missing tensor": lambda: train_reply(arrays=ArrayRecord({"global/layers.0.q.lora_A": Array(np.zeros((2, 3), np.float32))})),
    "wrong shape": lambda: train_reply(arrays=good_arrays(**{"global/layers.0.q.lora_A": np.zeros((3, 3), np.float32)})),
    "wrong dtype (text bytes as uint8)": lambda: train_reply(
        arrays=good_arrays(**{"global/layers.0.q.lora_A": np.frombuffer(SECRET.encode()[:6], np.uint8).reshape(2, 3)})
    ),
    "float64 smuggling": lambda: train_reply(arrays=good_arrays(**{"global/layers.0.q.lora_A": np.zeros((2, 3))})),
    "non-finite values": lambda: train_reply(arrays=good_arrays(**{"global/layers.0.q.lora_A": np.full((2, 3), np.nan, np.float32)})),
    "extra record": lambda: train_reply(extra=MetricRecord({"num-examples": 1})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_violations_raise_without_echoing_user_text(case):
    with pytest.raises(EgressViolation) as err:
        EgressGuard(SCHEMA).check(CASES[case](), "train")
    message = str(err.value)
    for fragment in ("Jane", "555-0100", "jane@example.com"):
        assert fragment not in message


def test_evaluate_reply_may_not_carry_arrays():
    with pytest.raises(EgressViolation):
        EgressGuard(SCHEMA).check(train_reply(), "evaluate")


def test_evaluate_replies_carry_no_per_user_metric():
    with pytest.raises(EgressViolation):
        EgressGuard(SCHEMA).check(RecordDict({METRICS: MetricRecord({"nll-base": 1.0, "num-examples": 3})}), "evaluate")


def test_the_message_config_allow_list():
    """A server message carries per-round values only: the round number. Everything else is refused."""
    assert message_config_violation({"server-round": 3}) is None
    assert message_config_violation({}) is None
    assert message_config_violation({"server-round": "3"}) == Reason.CONFIG_KEY_NOT_ALLOWED
    assert message_config_violation({"server-round": 1, "noise-multiplier": 0.0}) == Reason.CONFIG_KEY_NOT_ALLOWED
    assert message_config_violation({"store-dir": "/tmp"}) == Reason.DEVICE_PATH_FROM_SERVER
    assert message_config_violation({"wire-audit-dir": "/tmp"}) == Reason.DEVICE_PATH_FROM_SERVER
