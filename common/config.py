"""Run configuration: one flat dict of Flower-style ``kebab-case`` keys.

The same keys appear in ``pyproject.toml`` under ``[tool.flwr.app.config]``
(used by ``flwr run .``) and are overridden by the CLI's profiles and flags.
The ServerApp forwards the client-relevant subset in every message's
ConfigRecord, so clients need no configuration of their own except where the
device keeps its data (``--node-config user-file=... store-path=...``).
"""

from __future__ import annotations

DEFAULTS: dict[str, object] = {
    # model
    "model": "smollm2-135m",
    "lora-rank": 8,
    "lora-alpha": 16,
    "lora-targets": "q_proj,v_proj",
    "user-lora-rank": 4,
    "prompt-tokens": 4,
    "lora-split": "ffa",
    # persona tier (common/tiers.py): K slots, chosen on the device (IFCA); 0 = no persona tier
    "persona-slots": 4,
    "persona-assign": "kmeans",  # kmeans: nearest centroid of the device's profile embedding; ifca: lowest loss
    "persona-min-size": 3,  # a slot with fewer (noisy) members folds into the global tier that round
    "persona-init-std": 0.001,  # distinct seeded slot inits (round 1's choice is a uniform tie-break)
    "ifca-examples": 8,  # train examples a device scores each slot on to pick its persona
    # routing by data volume (training records on the device)
    "cold-start-below": 5,  # fewer: served by the global tier
    "frequent-from": 20,  # at least: served by global + persona + user; in between: global + persona
    # federation
    "num-server-rounds": 3,
    "num-supernodes": 20,
    "fraction-train": 1.0,
    "round-timeout": 3600.0,
    # local training and record-level DP (Opacus)
    "local-steps": 2,
    "batch-size": 6,
    "lr": 0.02,
    "optimizer": "adam",
    "max-len": 56,
    "dp": True,
    "noise-multiplier": 1.0,
    "max-grad-norm": 1.0,
    "delta": 1e-5,
    # user-level DP-FedAvg on the shared tier (Flower's client-side fixed clipping)
    "user-dp": False,
    "user-noise-multiplier": 1.0,
    "user-clip-norm": 1.0,
    "user-delta": 1e-3,
    "user-max-epsilon": 0.0,  # 0 = no budget; else stop before a round would exceed it
    # secure aggregation (SecAgg+ stages over the Message API; server sees sums only)
    "secagg": False,
    "secagg-clip-range": 1.0,  # fixed-point range per update coordinate; larger values are clipped on the device
    "secagg-modulus-bits": 32,
    # with user-dp under secagg: "distributed" = each client adds a Gaussian share to its
    # masked update (no party sees a noiseless sum); "server" = the server adds it to the sum
    "secagg-noise": "distributed",
    "secagg-max-dropout": 0.3,  # unmask only if >= (1 - this) of the sample survive (the noise shares' denominator)
    # audits: record every client reply here (protobuf wire bytes) for the wire audit; "" = off
    "wire-audit-dir": "",
    # data and devices
    "data-dir": "data/default",
    "store-dir": "",
    "scrub-mode": "full",
    "scrub-operator": "tag",
    "scrub-config": "",  # Presidio-format YAML for the device scrubber; "" = client/pii/scrub_default.yaml
    "num-personas": 4,
    "holdout-users": 4,  # generated but never federated: non-members for the user-level membership audit
    "seed": 0,
    # server-side output
    "run-dir": "runs/latest",
}

# Size/time trade-off knob. "default" is sized for `make demo` (<= 10 min on two
# cores, install included); "quick" is for smoke tests; "full" for experiments.
PROFILES: dict[str, dict[str, object]] = {
    "quick": {"model": "tiny-random", "num-supernodes": 6, "num-personas": 3, "persona-slots": 3, "persona-min-size": 1, "num-server-rounds": 2, "local-steps": 2},
    "default": {},
    "full": {"num-supernodes": 32, "num-server-rounds": 5, "local-steps": 4, "batch-size": 16},
}

SERVER_ONLY = {"run-dir"}  # (generator-only keys like holdout-users are harmless in client messages)


def build_config(profile: str = "default", overrides: dict | None = None) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    cfg = {**DEFAULTS, **PROFILES[profile], **(overrides or {})}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
    return cfg


def client_config(run_config: dict) -> dict:
    """The subset of the run config sent to clients in each message."""
    return {k: v for k, v in run_config.items() if k not in SERVER_ONLY}
