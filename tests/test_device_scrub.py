"""The device's scrubbing settings: scrub-config (user YAML) and the pseudonym operator's secret."""

from __future__ import annotations

import re
from pathlib import Path

from client import device
from client.pii import DEFAULT_CONFIG_PATH, Scrubber
from common.config import build_config, client_config

PSEUDONYM = re.compile(r"<[A-Z_]+_[0-9a-f]{8}>")
BARE_TAG = re.compile(r"<[A-Z_]+>")


def _cfg(tiny_data: Path, tmp_path: Path, **extra) -> dict:
    return client_config(build_config("quick", {"data-dir": str(tiny_data / "data"),
                                                "store-dir": str(tmp_path / "devices"),
                                                "scrub-mode": "patterns", **extra}))


def test_pseudonym_operator_keys_each_device_with_its_own_stored_secret(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, **{"scrub-operator": "pseudonym"})
    stores = [device.open_store(cfg, {"partition-id": p, "num-partitions": 3}) for p in (0, 1)]
    secrets = [s.device_secret() for s in stores]
    assert all(len(s) == 32 for s in secrets) and secrets[0] != secrets[1]
    # Stable: reopening the store gives the same secret (pseudonyms stay consistent).
    again = device.open_store(cfg, {"partition-id": 0, "num-partitions": 3})
    assert again.device_secret() == secrets[0]
    texts = [t for s in stores for t in s.documents() + [o for _, o in s.tasks("train")]]
    assert any(PSEUDONYM.search(t) for t in texts)
    assert not any(BARE_TAG.search(t) for t in texts)
    # The token is the device's HMAC of the value, so the same name maps to
    # the same token on one device and to another token elsewhere.
    a = Scrubber.from_config(mode="patterns", operator="pseudonym", device_secret=secrets[0])
    b = Scrubber.from_config(mode="patterns", operator="pseudonym", device_secret=secrets[1])
    assert a.pseudonym("PERSON", "Jane Roe") != b.pseudonym("PERSON", "Jane Roe")


def test_scrub_config_points_the_device_at_a_user_yaml(tiny_data, tmp_path):
    yaml_path = tmp_path / "mine.yaml"
    yaml_path.write_text(DEFAULT_CONFIG_PATH.read_text(encoding="utf-8") + """
    - name: ProjectCodeRecognizer
      type: custom
      supported_entity: PROJECT_CODE
      supported_language: en
      patterns:
        - {name: code, regex: "\\\\bPRJ-\\\\d{4}\\\\b", score: 0.6}
""", encoding="utf-8")
    cfg = _cfg(tiny_data, tmp_path, **{"scrub-config": str(yaml_path)})
    scrub = device.scrubber(cfg["scrub-mode"], cfg["scrub-operator"], cfg["scrub-config"])
    assert scrub(["Ship PRJ-1234 today."])[0].text == "Ship <PROJECT_CODE> today."
    default = device.scrubber(cfg["scrub-mode"], cfg["scrub-operator"])
    assert "PRJ-1234" in default(["Ship PRJ-1234 today."])[0].text
