"""The dropout matrix: devices that vanish mid-round, against the round's outcome and the sum's error.

Drives the real strategy (``TieredFedAvg``) and the real ClientApp in-process
(``benchmarks.loopback``) on N devices with the tiny random model, for dropout
fractions 0, 10, 30 and 50 % and two modes: secure aggregation (the default,
``secagg=true``) and plain summation (``secagg=false``). A dropped device
drops at the realistic point: it takes part in the key and share stages,
receives its train message, trains (and is charged for it), masks its
update, and then vanishes: its train reply never arrives and it answers no
later message. In plain mode, likewise, the device trains and its reply is
lost.

Each cell is round 1 of its own strategy, from the same initial tiers, on
devices that have never trained (copies of stores ingested and scrubbed once,
so no cell inherits another's spent budget or cached release; the same
devices drop in both modes). Each cell reports:

* the outcome: ``aggregated``, or ``skipped`` with the reason the server
  logged (a secure sum refuses to unmask fewer than
  ``max(threshold, ceil((1 - secagg-max-dropout) * n))`` inputs);
* contributors (the server's count) and the survivors (train replies that
  arrived);
* the sum's error: the largest absolute difference between the sum the
  server applied and the exact float64 sum of the survivors' released
  updates, captured on the devices (before masking, or from the plain reply,
  lost ones included), next to the fixed-point bound of the secure sum; and
  the largest difference between the tiers the server keeps and the tiers
  recomputed from that exact sum;
* nothing lost: after a skipped round the server's tiers are bit-for-bit
  the ones it started from; every device that trained was charged DP-SGD
  steps on its own accountant, the dropped ones included (spent budget is
  conservative: a lost update still counts).

    python -m benchmarks.dropout_matrix            # 10 devices, both modes (the table in docs/results.md)
    python -m benchmarks.dropout_matrix --quick    # 5 devices, 1 local step, every cell (about a minute)
    python -m benchmarks.dropout_matrix --smoke    # 5 devices, 1 local step: secure at every fraction, plain 50 % (tests/test_dropout.py)

Last line: ``RESULT dropout_matrix key=value ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import SMOKE_PROFILE, add_size_flags, result_line

FRACTIONS = (0.0, 0.1, 0.3, 0.5)
MODES = ("secure", "plain")
CELLS = tuple((mode, fraction) for mode in MODES for fraction in FRACTIONS)
SMOKE_CELLS = tuple(("secure", f) for f in FRACTIONS) + (("plain", 0.5),)  # also tests/test_dropout.py's matrix
WATCHED_LOGGERS = ("common.privacy.sums", "server.strategy")


class _Warnings(logging.Handler):
    """The server's warnings during one round (the reason a round was skipped)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _watch(released: dict, applied: list):
    """Spy on a round: each device's vector as it goes into masking, and the sum the server applies."""
    from common.secagg import SecAggClient
    from server import strategy as strategy_mod

    real_mask, real_apply = SecAggClient.masked_input, strategy_mod.apply_sum

    def masked_input(self, msg, vector=None, **kw):
        released[self.node_id] = np.array(vector, dtype=np.float64, copy=True)
        return real_mask(self, msg, vector, **kw)

    def apply_sum(arrays, codec, total, *args, **kw):
        applied.append(np.array(total, dtype=np.float64, copy=True))
        return real_apply(arrays, codec, total, *args, **kw)

    handler = _Warnings()
    loggers = [logging.getLogger(name) for name in WATCHED_LOGGERS]
    SecAggClient.masked_input, strategy_mod.apply_sum = masked_input, apply_sum
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield handler.messages
    finally:
        SecAggClient.masked_input, strategy_mod.apply_sum = real_mask, real_apply
        for lg in loggers:
            lg.removeHandler(handler)


def _steps_charged(contexts: dict, folder: Path) -> dict[int, int]:
    """DP-SGD steps on each device's own record-level accountant so far."""
    from client import device
    from client.accounting import accountant_history

    out = {}
    for nid in contexts:
        store = device.DeviceStore(folder / f"device-{nid}" / "store.sqlite")
        history = accountant_history(device.accountant_state(store))
        # The context phrases' release (client/context.py) is the first entry of a device that made it: not a DP-SGD step.
        released = history and device.get_json(store, device.CONTEXT, None) is not None
        out[nid] = int(sum(h[2] for h in history[1 if released else 0:]))
    return out


def _dropped(node_ids: list[int], fraction: float, seed: int) -> list[int]:
    """round(fraction * n) devices (halves round up), drawn once per fraction (the same in both modes)."""
    k = int(math.floor(fraction * len(node_ids) + 0.5))
    return sorted(random.Random(f"{seed}:{fraction}").sample(node_ids, k))


def run_cell(cfg, contexts: dict, folder: Path, arrays, server_round: int, dropped: list[int]) -> dict:
    """One round with ``dropped`` devices vanishing after they trained; the cell's row."""
    from flwr.app import ConfigRecord

    from benchmarks.loopback import LoopbackGrid, codec_for, strategy_for
    from client.app import app
    from common.wire import ARRAYS, refusal_reason
    from server.aggregate import apply_sum

    codec = codec_for(cfg)
    strategy = strategy_for(cfg, num_rounds=server_round)
    grid = LoopbackGrid(app, contexts, lose={(nid, "train") for nid in dropped})
    before = {k: v.numpy().copy() for k, v in arrays.items()}
    charged_before = _steps_charged(contexts, folder)
    released: dict[int, np.ndarray] = {}
    applied: list[np.ndarray] = []
    raised = None
    new = None
    t0 = time.perf_counter()
    with _watch(released, applied) as warnings:
        try:
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = grid.send_and_receive(messages, timeout=strategy.timeout)
            new, _ = strategy.aggregate_train(server_round, replies)
        except Exception as err:  # noqa: BLE001 - a raise out of the strategy is a finding, reported as such
            raised, replies = type(err).__name__, []
    seconds = time.perf_counter() - t0
    secure = cfg.secagg.enabled
    survivors = sorted(r.metadata.src_node_id for r in replies if r.has_content() and refusal_reason(r.content) is None)
    if not secure:  # the plain update is the reply itself: the ones that arrived and the lost ones
        for nid, reply in [(r.metadata.src_node_id, r) for r in replies] + grid.lost:
            if reply.has_content() and refusal_reason(reply.content) is None:
                released[nid] = codec.flatten(reply.content[ARRAYS]).astype(np.float64)
    row = strategy.rounds.get(server_round, {})
    held = {k: v.numpy() for k, v in (new if new is not None else arrays).items()}
    charged = {nid: n - charged_before[nid] for nid, n in _steps_charged(contexts, folder).items()}
    cell = {
        "mode": "secure" if secure else "plain",
        "n": len(contexts),
        "dropped": len(dropped),
        "outcome": "raised" if raised else ("aggregated" if new is not None else "skipped"),
        "reason": raised or "",
        "contributors": int(row.get("contributors", 0)),
        "survivors": len(survivors),
        "refused": sum(row.get("refused", {}).values()),
        "sum_err": None,
        "rel_err": None,
        "tier_err": None,
        "bound": None,
        "clipped": 0,
        "tiers_unchanged": None,
        "steps_dropped": [charged[n] for n in dropped],
        "steps_survivors": [charged[n] for n in survivors],
        "seconds": round(seconds, 1),
    }
    server = getattr(strategy, "_round", None)
    params = server.state["secagg"].params if server is not None and "secagg" in server.state else None
    if secure and params is not None:
        cell["min_survivors"], cell["threshold"] = params.min_survivors, params.threshold
    if new is None:
        cell["tiers_unchanged"] = all(np.array_equal(held[k], before[k]) for k in before)
        if not raised:
            reason = next((m for m in warnings if "aborted" in m or "no update" in m), warnings[0] if warnings else "")
            cell["reason"] = reason.split(": ", 1)[1] if reason.startswith("round ") else reason
        return cell
    exact = np.sum([released[n] for n in survivors], axis=0)
    cell["sum_err"] = float(np.abs(applied[-1] - exact).max())
    cell["rel_err"] = cell["sum_err"] / max(float(np.abs(exact).max()), 1e-300)
    expected, _ = apply_sum(before, codec, exact, row["expected"], cfg.persona.min_size, exact_counts=not cfg.user_dp.enabled)
    cell["tier_err"] = float(max(np.abs(held[k].astype(np.float64) - expected[k]).max() for k in before))
    if secure:
        cell["bound"] = params.codec.error_bound(len(survivors))
        cell["clipped"] = int(sum(np.count_nonzero(np.abs(released[n]) > params.clip_range) for n in survivors))
    return cell


def _ingest(root: Path, cfg, users: list[Path]) -> Path:
    """Every device's store, ingested and scrubbed once (first-contact work, not part of a round)."""
    from benchmarks.loopback import device_context
    from client.device import open_store
    from client.policy import DevicePolicy

    folder = root / "ingested"
    for i, user in enumerate(users):
        node_config = dict(device_context(folder, 100 + i, user, cfg).node_config)
        open_store(cfg, DevicePolicy.for_node(node_config), node_config)
    return folder


def _fresh_devices(ingested: Path, folder: Path, cfg, users: list[Path]) -> dict:
    """Devices that have never trained: copies of the ingested stores, each with the mode's policy."""
    from benchmarks.loopback import device_context

    contexts = {}
    for i, user in enumerate(users):
        shutil.copytree(ingested / f"device-{100 + i}", folder / f"device-{100 + i}")
        contexts[100 + i] = device_context(folder, 100 + i, user, cfg)
    return contexts


def dropout_matrix(n: int = 10, cells=CELLS, overrides: dict | None = None, seed: int = 0) -> list[dict]:
    """The (mode, fraction) ``cells`` on ``n`` fresh devices with the tiny model; the rows in order.

    Each cell is round 1 of its own strategy on devices that have never
    trained (copies of stores ingested once), so no cell inherits another's
    spent budget, optimizer state or cached release.
    """
    from flwr.supercore.task_identity import TaskIdentity

    from benchmarks.loopback import initial_arrays
    from common.config import build_config
    from simulations.personas import DatasetSpec, generate_dataset

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_dataset(root / "data", DatasetSpec(num_users=n, num_personas=3, seed=1))
        users = sorted((root / "data" / "users").glob("*.jsonl"))
        # No context phrases: this matrix measures the secure sum under dropout. With them, a device under
        # frequent-from spends most of its budget on the release and its DP-SGD update is noisier
        # (client.accounting.release_noise): on the tiny model some of its coordinates then fall outside
        # the fixed-point range, where the sum's error bound does not hold by construction.
        base = {"model": "tiny-random", "num-supernodes": n, "scrub-mode": "patterns", "context": "none", **(overrides or {})}
        ingested = _ingest(root, build_config(SMOKE_PROFILE, base), users)
        configs = {mode: build_config(SMOKE_PROFILE, {**base, "secagg": mode == "secure"}) for mode in dict(cells)}
        arrays = {mode: initial_arrays(cfg) for mode, cfg in configs.items()}
        for mode, fraction in cells:
            folder = root / f"{mode}-{round(fraction * 100)}"
            contexts = _fresh_devices(ingested, folder, configs[mode], users)
            cell = run_cell(configs[mode], contexts, folder, arrays[mode], 1, _dropped(list(contexts), fraction, seed))
            cell["fraction"] = fraction
            cell["max_dropout"] = configs[mode].secagg.max_dropout
            rows.append(cell)
            print(_line(cell), flush=True)
    return rows


HEADER = ("mode", "dropped", "outcome", "contributors", "sum error", "relative", "bound", "tier error", "tiers kept", "DP-SGD steps charged (dropped / survivors)", "round s", "server's reason")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def _line(c: dict) -> str:
    dropped = f"{c['fraction']:.0%} ({c['dropped']}/{c['n']})"
    steps = f"{sorted(set(c['steps_dropped'])) or '-'} / {sorted(set(c['steps_survivors'])) or '-'}"
    kept = "-" if c["tiers_unchanged"] is None else ("yes" if c["tiers_unchanged"] else "NO")
    cols = (c["mode"], dropped, c["outcome"], f"{c['contributors']}/{c['n']}", _fmt(c["sum_err"]), _fmt(c["rel_err"]), _fmt(c["bound"]),
            _fmt(c["tier_err"]), kept, steps, c["seconds"], c["reason"] or (f"{c['clipped']} coordinates outside the fixed-point range" if c["clipped"] else "-"))
    return "| " + " | ".join(map(str, cols)) + " |"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="which devices drop (the same ones in both modes)")
    add_size_flags(ap, quick="5 devices, every cell, 1 local step (about a minute)")
    args = ap.parse_args(argv)
    cells, overrides = CELLS, {}
    if args.quick:
        args.devices, overrides = 5, {"local-steps": 1}
    if args.smoke:
        args.devices, cells, overrides = 5, SMOKE_CELLS, {"local-steps": 1}
    t0 = time.perf_counter()
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    rows = dropout_matrix(args.devices, cells, overrides, args.seed)
    res = {"devices": args.devices, "cells": len(rows)}
    for c in rows:
        key = f"{c['mode']}_{round(c['fraction'] * 100)}"
        res[key] = c["outcome"]
        if c["sum_err"] is not None:
            res[key + "_err"] = f"{c['sum_err']:.1e}"
    res["raised"] = sum(c["outcome"] == "raised" for c in rows)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(result_line("dropout_matrix", res))
    return {**res, "rows": rows}


if __name__ == "__main__":
    main()
