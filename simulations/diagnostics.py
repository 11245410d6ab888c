"""Simulation-only diagnostics: figures that need ground truth no server may hold.

The simulation harness plays every device, so it may read what the devices kept
to themselves, and the generator's ground truth (``manifest.json``). Nothing
here is part of the federated protocol; it lives in ``simulations/`` and goes
into the harness's ``report.json``, never into the server's report.

* **Persona recovery**: how well the devices' private persona choices recover the
  generator's personas, per round: adjusted Rand index (1 = the true partition
  up to relabelling, ~0 = chance) and purity.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from client.persona import CHOICE_STATE
from client.store import DeviceStore


def _purity(truth: list[int], chosen: list[int]) -> float:
    by_slot: dict[int, Counter] = {}
    for t, c in zip(truth, chosen):
        by_slot.setdefault(c, Counter())[t] += 1
    return sum(max(c.values()) for c in by_slot.values()) / len(truth) if truth else float("nan")


def persona_recovery(harness: dict) -> dict:
    """Per phase ("train", "evaluate") and round: ARI and purity of the devices' choices."""
    from sklearn.metrics import adjusted_rand_score

    manifest = json.loads((Path(harness["data_dir"]) / "manifest.json").read_text())
    persona_of = {u["user_id"]: u["persona"] for u in manifest["users"]}
    choices = {}
    for dev in harness["devices"]:
        path = Path(dev["store"])
        if not path.is_file():
            continue
        blob = DeviceStore(path).get_state(CHOICE_STATE)
        if blob:
            choices[dev["user_id"]] = (persona_of[dev["user_id"]], json.loads(blob))
    out: dict = {"users": len(choices), "slots": int(harness["run"]["persona-slots"]), "rounds": {}}
    for phase in ("train", "evaluate"):
        rounds = sorted({int(r) for _, h in choices.values() for r in h.get(phase, {})})
        for rnd in rounds:
            pairs = [(t, h[phase][str(rnd)]) for t, h in choices.values() if str(rnd) in h.get(phase, {})]
            truth, chosen = [p[0] for p in pairs], [p[1] for p in pairs]
            out["rounds"][f"{phase}-{rnd}"] = {
                "users": len(pairs),
                "adjusted_rand_index": round(float(adjusted_rand_score(truth, chosen)), 4),
                "purity": round(_purity(truth, chosen), 4),
                "slot_sizes": dict(sorted(Counter(chosen).items())),
            }
    return out
