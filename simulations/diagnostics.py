"""Simulation-only diagnostics: figures that need ground truth no server may hold.

The simulation harness plays every device, so it may read what the devices kept
to themselves, and the generator's ground truth (``manifest.json``). Nothing
here is part of the federated protocol; it lives in ``simulations/`` and writes
``diagnostics.json`` next to (never into) the server's report.

* **Persona recovery**: how well the devices' private IFCA choices recover the
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


def persona_recovery(run_dir: Path) -> dict:
    """Per phase ("train", "evaluate") and round: ARI and purity of the devices' choices."""
    from sklearn.metrics import adjusted_rand_score

    cfg = json.loads((run_dir / "config.json").read_text())
    manifest = json.loads((Path(cfg["data-dir"]) / "manifest.json").read_text())
    choices = {}
    for user in manifest["users"]:
        store_path = Path(cfg["store-dir"]) / f"{Path(user['file']).stem}.sqlite"
        if not store_path.is_file():
            continue
        blob = DeviceStore(store_path).get_state(CHOICE_STATE)
        if blob:
            choices[user["user_id"]] = (user["persona"], json.loads(blob))
    out: dict = {"users": len(choices), "slots": int(cfg.get("persona-slots", 0)), "rounds": {}}
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


def write_diagnostics(run_dir: Path) -> dict:
    diag = {"persona_recovery": persona_recovery(run_dir)}
    (run_dir / "diagnostics.json").write_text(json.dumps(diag, indent=2))
    return diag
