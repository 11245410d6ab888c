"""The device's scrubbing settings: scrub-config (user YAML) and the pseudonym operator's secret."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import quick, user_files

from client import device
from client.pii import DEFAULT_CONFIG_PATH, Scrubber
from client.policy import DevicePolicy
from client.store import IngestError

PSEUDONYM = re.compile(r"<[A-Z_]+_[0-9a-f]{8}>")
BARE_TAG = re.compile(r"<[A-Z_]+>")


def _store(tiny_data: Path, tmp_path: Path, index: int, **policy):
    cfg = DevicePolicy(user_file=str(user_files(tiny_data)[index]), store_path=str(tmp_path / f"d{index}.sqlite"), min_scrub_mode="patterns", **policy)
    return device.open_store(cfg.admit(quick(secagg=False, scrub_mode="patterns")), cfg, {})


def test_pseudonym_operator_keys_each_device_with_its_own_stored_secret(tiny_data, tmp_path):
    stores = [_store(tiny_data, tmp_path, p, scrub_operator="pseudonym") for p in (0, 1)]
    secrets = [s.device_secret() for s in stores]
    assert all(len(s) == 32 for s in secrets) and secrets[0] != secrets[1]
    # Stable: reopening the store gives the same secret (pseudonyms stay consistent).
    again = _store(tiny_data, tmp_path, 0, scrub_operator="pseudonym")
    assert again.device_secret() == secrets[0]
    texts = [t for s in stores for t in s.documents() + [o for _, o in s.tasks("train")]]
    assert any(PSEUDONYM.search(t) for t in texts)
    assert not any(BARE_TAG.search(t) for t in texts)
    # The token is the device's HMAC of the value, so the same name maps to
    # the same token on one device and to another token elsewhere.
    a = Scrubber.from_config(mode="patterns", operator="pseudonym", device_secret=secrets[0])
    b = Scrubber.from_config(mode="patterns", operator="pseudonym", device_secret=secrets[1])
    assert a.pseudonym("PERSON", "Jane Roe") != b.pseudonym("PERSON", "Jane Roe")


def test_the_scrubber_yaml_is_the_device_owners_never_the_runs(tiny_data, tmp_path):
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8") + """
    - name: ProjectCodeRecognizer
      type: custom
      supported_entity: PROJECT_CODE
      supported_language: en
      patterns:
        - {name: code, regex: "\\\\bPRJ-\\\\d{4}\\\\b", score: 0.6}
""", encoding="utf-8")
    policy = DevicePolicy(scrub_config=str(yaml_path), min_scrub_mode="patterns")
    # A run config that names another YAML (say, one with no recognizers) is ignored: the policy's stands.
    admitted = policy.admit(quick(secagg=False, scrub_mode="patterns", scrub_config="/tmp/empty.yaml", scrub_operator="mask"))
    assert (admitted.scrub.config, admitted.scrub.operator) == (str(yaml_path), "tag")
    scrub = device.scrubber(admitted.scrub.mode, admitted.scrub.operator, admitted.scrub.config)
    assert scrub(["Ship PRJ-1234 today."])[0].text == "Ship <PROJECT_CODE> today."
    default = device.scrubber("patterns", "tag")
    assert "PRJ-1234" in default(["Ship PRJ-1234 today."])[0].text


def test_the_policy_names_the_key_file_and_an_unchanged_file_builds_no_scrubber(tiny_data, tmp_path, monkeypatch):
    key = tmp_path / "keys" / "device.key"
    store = _store(tiny_data, tmp_path, 0, key_file=str(key))
    assert store.key_file == key and key.is_file() and not (tmp_path / "d0.key").exists()
    before = store.num_records()

    def no_scrubber(*args):
        raise AssertionError("the scrubber was built for an unchanged file")
    monkeypatch.setattr(device, "scrubber", no_scrubber)
    again = _store(tiny_data, tmp_path, 0, key_file=str(key))
    assert again.num_records() == before and again.device_secret() == store.device_secret()


def test_a_failed_first_ingest_leaves_no_store_and_no_key_it_created(tmp_path):
    bad = tmp_path / "u.jsonl"
    bad.write_text('{"type":"document","id":"d1","text":"ok"}\n{"type":"document"}\n')
    shared_key = tmp_path / "device.key"
    for key_file in ("", str(shared_key)):
        policy = DevicePolicy(user_file=str(bad), store_path=str(tmp_path / "s.sqlite"), min_scrub_mode="patterns", key_file=key_file)
        if key_file:
            device.DeviceStore(tmp_path / "other.sqlite", shared_key)  # a key other stores use
        with pytest.raises(IngestError, match=r"u\.jsonl:2: missing_field:id"):
            device.open_store(policy.admit(quick(secagg=False, scrub_mode="patterns")), policy, {})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["u.jsonl"] + (["device.key", "other.sqlite"] if key_file else []))
