"""The device's own privacy floor: a policy the server can tighten but never weaken.

A device reads its :class:`DevicePolicy` from its own ``node_config``
(``--node-config`` of ``flower-supernode``) and an optional local policy file
(``policy-file``, TOML or JSON, the device owner's). In simulation the harness
writes one file per device from the run's own settings and names the folder
in :data:`SIM_POLICY_DIR_ENV` before the engine starts.

The run config a device receives comes from whoever submitted the run, so for
the device it is a request. :meth:`DevicePolicy.admit` turns it into the
settings the device will really use: it keeps every request that is at least
as strict as the floor (a stricter scrub mode, more noise, a smaller clip, a
lower epsilon cap) and raises :class:`Refused` with a reason code for any
request that would loosen it. Admission reads and writes nothing, so a refused
message leaves the device's data and state untouched.

Everything about *where* the device reads and writes (its user file, its
store and the store's key file, its scrubber YAML) comes from here and never
from a server.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig, coerce_value
from common.wire import Reason

# The simulation harness names its folder of per-device policy files here
# (policy-0000.json for partition 0, ...): a setting of the device's machine,
# not of any server message.
SIM_POLICY_DIR_ENV = "FEDPERSONA_SIM_POLICIES"

SCRUB_RANK = {"off": 0, "patterns": 1, "full": 2}


class Refused(Exception):
    """A message the device declines. Only :attr:`reason` (a code) ever leaves the device."""

    def __init__(self, reason: Reason, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason.name}" + (f": {detail}" if detail else ""))


class PolicyError(ValueError):
    """The owner's policy is malformed (names the file and key, never a value)."""


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class DevicePolicy:
    """The floor. Field names map to kebab-case keys in the policy file and node_config."""

    user_file: str = ""  # the user's raw JSONL; "" = the simulation's data folder
    store_path: str = ""  # the device store; "" = next to the user file
    key_file: str = ""  # the store's encryption key (0600); "" = next to the store, <store>.key
    min_scrub_mode: str = "full"
    audit_control_arm: bool = False  # only an audit control arm may store raw text (scrub mode off)
    scrub_operator: str = "tag"
    scrub_config: str = ""  # the owner's Presidio YAML; "" = the packaged default
    dp_required: bool = True
    min_noise_multiplier: float = 1.0
    max_clip_norm: float = 1.0
    max_delta: float = 1e-5
    max_epsilon: float = 8.0  # record-level; 0 = no cap. Past it the device declines to train.
    require_secagg: bool = False
    persona_tier: bool = True  # take part in the persona tier (else its slots stay zero)
    max_rounds: int = 0  # user-level participation budget in training rounds; 0 = unlimited

    def __post_init__(self) -> None:
        if self.min_scrub_mode not in SCRUB_RANK:
            raise PolicyError("policy key 'min-scrub-mode': must be one of full, patterns, off")
        if self.min_scrub_mode == "off" and not self.audit_control_arm:
            raise PolicyError("policy key 'min-scrub-mode': off is allowed only with audit-control-arm = true")
        if self.scrub_operator not in ("tag", "mask", "pseudonym"):
            raise PolicyError("policy key 'scrub-operator': must be one of tag, mask, pseudonym")
        for name in ("min_noise_multiplier", "max_clip_norm", "max_epsilon"):
            if getattr(self, name) < 0:
                raise PolicyError(f"policy key '{_key(name)}': must be >= 0")
        if not 0 < self.max_delta < 1:
            raise PolicyError("policy key 'max-delta': must lie strictly between 0 and 1")
        if self.max_rounds < 0:
            raise PolicyError("policy key 'max-rounds': must be >= 0")

    # -- reading ----------------------------------------------------------------------
    @classmethod
    def _values(cls, values: dict[str, Any], source: str) -> dict[str, Any]:
        """Typed field values from a mapping of kebab-case keys."""
        known = {_key(f.name): f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise PolicyError(f"{source}: unknown policy key '{unknown[0]}'")
        out = {}
        for key, value in values.items():
            f = known[key]
            try:
                out[f.name] = coerce_value(key, value, f.default)
            except ConfigError as err:
                raise PolicyError(f"{source}: policy key '{key}': {err.reason}") from None
        return out

    @classmethod
    def _build(cls, values: dict[str, Any], source: str) -> "DevicePolicy":
        try:
            return cls(**values)
        except PolicyError as err:
            raise PolicyError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: Path) -> "DevicePolicy":
        return cls._build(cls._file_values(Path(path)), str(path))

    @classmethod
    def _file_values(cls, path: Path) -> dict[str, Any]:
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise PolicyError(f"{path}: cannot read the policy file ({type(err).__name__})") from None
        try:
            values = tomllib.loads(raw.decode("utf-8")) if path.suffix == ".toml" else json.loads(raw)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, json.JSONDecodeError):
            raise PolicyError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}") from None
        if not isinstance(values, dict):
            raise PolicyError(f"{path}: the policy must be a table of keys")
        out = cls._values(values, str(path))
        # Relative data paths are relative to the policy file, as the owner wrote them.
        for name in ("user_file", "store_path", "key_file", "scrub_config"):
            if out.get(name) and not Path(out[name]).is_absolute():
                out[name] = str(path.parent / out[name])
        return out

    @classmethod
    def for_node(cls, node_config: dict) -> "DevicePolicy":
        """This node's policy: its policy file with ``node_config`` keys on top.

        A simulated node (Flower's ``partition-id`` and nothing else) reads the
        file the harness wrote for it; with no harness either, the defaults.
        """
        node = {k: v for k, v in dict(node_config).items() if k not in ("partition-id", "num-partitions")}
        file = node.pop("policy-file", None)
        if file is None and not node and os.environ.get(SIM_POLICY_DIR_ENV) and "partition-id" in node_config:
            file = Path(os.environ[SIM_POLICY_DIR_ENV]) / sim_policy_name(int(node_config["partition-id"]))
        values = cls._file_values(Path(str(file))) if file is not None else {}
        values.update(cls._values(node, "node_config"))
        return cls._build(values, str(file) if file is not None else "node_config")

    def to_mapping(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    # -- admission ------------------------------------------------------------------------
    def admit(self, run: RunConfig) -> RunConfig:
        """The settings this device will use for ``run``, or :class:`Refused` if it asks to loosen the floor."""
        t = run.train
        if SCRUB_RANK[run.scrub.mode] < SCRUB_RANK[self.min_scrub_mode] or (run.scrub.mode == "off" and not self.audit_control_arm):
            raise Refused(Reason.SCRUB_BELOW_FLOOR)
        if self.dp_required and not t.dp:
            raise Refused(Reason.DP_REQUIRED)
        if t.dp and t.target_epsilon == 0 and t.noise_multiplier < self.min_noise_multiplier:
            # (With a target epsilon the device calibrates its own noise, never below this floor.)
            raise Refused(Reason.NOISE_BELOW_FLOOR)
        if t.dp and t.max_grad_norm > self.max_clip_norm:
            raise Refused(Reason.CLIP_ABOVE_CEILING)
        if t.dp and t.delta > self.max_delta:
            raise Refused(Reason.DELTA_ABOVE_CEILING)
        if self.require_secagg and not run.secagg.enabled:
            raise Refused(Reason.SECAGG_REQUIRED)
        caps = [c for c in (self.max_epsilon, t.max_epsilon) if c > 0]
        return run.with_values(**{
            # A stricter request than the floor is kept; the operator and YAML are always the device's.
            "scrub-mode": max(run.scrub.mode, self.min_scrub_mode, key=SCRUB_RANK.__getitem__),
            "scrub-operator": self.scrub_operator,
            "scrub-config": self.scrub_config,
            "max-epsilon": min(caps) if caps else 0.0,
        })


def sim_policy_name(partition_id: int) -> str:
    return f"policy-{partition_id:04d}.json"


def write_policy(path: Path, policy: DevicePolicy) -> None:
    """Write a policy file (the simulation harness writes one per device)."""
    Path(path).write_text(json.dumps(policy.to_mapping(), indent=2))
