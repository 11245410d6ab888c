"""Secure aggregation at N = 100 and 1,000 with the deployed parameters (issue 15, figure d).

One process plays the server and all N clients of :mod:`common.secagg`, stage
by stage, with what a default run deploys: the session parameters of the
``secure-sum`` privacy step (``SecAggParams.create`` with the default colluder
and dropout fractions, so the neighbour graph of ``choose_neighbours``: k = 60
at N = 100, k = 174 at N = 1,000) and the masked vector's real length, the
K-slot train reply of the default config on SmolLM2-135M (the global tier,
the persona slots, the centroid block and the counts; the length is taken
from the codec on the live model and printed).

* Clients are stateless between stages, as the Message-API ClientApp is: each
  stage rebuilds the client from its ``to_state()`` dict and saves it again
  (timed as part of the stage). Each client's float vector is drawn from its
  seed when it masks and dropped afterwards, so at most one full vector (plus
  the server's running sum and the plain reference sum) is alive at a time.
* Simulated clients share one derivation of the neighbour graph
  (``_draw_graph`` is cached per process); every real device and the server
  derive it themselves, so one cold derivation, measured, is added to each
  device's and to the server's time.
* Server memory: the bytes the server object holds after each stage (a deep
  size of its fields, numpy buffers included) plus, for each call that builds
  something (``*_messages``, ``finalize``), the peak of the Python allocations
  it makes (``tracemalloc``), measured on a deep copy of the server so that
  the timed call runs untraced.
* Bytes per client: every stage message and reply serialised as the apps send
  it (a ``RecordDict`` holding the ``secagg`` ConfigRecord, or the ``masked``
  ArrayRecord) through Flower's protobufs, as the server report counts them;
  without gRPC framing or message metadata.
* The plain round is measured in the same run: the per-client training time is
  the median of real record-level DP-SGD updates (``client.train.train_local``
  with the default config's steps, batch and length, on 30 records) after a
  warm-up call, and the plain server sum is a float64 running sum of
  the same N vectors. Ratios (the composition is stated, it is not a Flower
  round): ``round = (N (train + client secagg) + server secagg) / (N train +
  plain sum)`` (all the work on one machine), ``device = (train + client
  secagg) / train`` (what one deployed device sees) and ``latency = (train +
  client secagg + server secagg) / (train + plain sum)`` (devices in parallel,
  no network).

    python -m benchmarks.secagg_scale            # N = 100 and 1,000 at the real length (~4 min on two cores)
    python -m benchmarks.secagg_scale --quick    # N = 100 at 1/10 of the length (< 1 min)
    python -m benchmarks.secagg_scale --smoke    # tiny random model, N = 12 (seconds; figures meaningless)

Last line: ``RESULT secagg_scale key=value ...``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import time
import tracemalloc
import warnings
from collections import defaultdict

import numpy as np

from benchmarks._common import add_set_flag, add_size_flags, parse_sets, result_line
from benchmarks.secagg_overhead import client_vector

STAGES = ("setup", "share_keys", "masked_input", "unmask")


# --------------------------------------------------------------- deployed setup


def deployed(model_name: str, overrides: dict | None = None):
    """The default run's config (with ``overrides``), model, K-slot codec and secure-sum step (as ``client.app._wire`` builds them)."""
    from benchmarks.loopback import codec_for
    from common.config import build_config
    from common.models import AdapterSpec, personal_model
    from common.privacy.pipeline import build_pipeline

    cfg = build_config("default", {"model": model_name, **(overrides or {})})
    model = personal_model(AdapterSpec.from_config(cfg))
    codec = codec_for(cfg)
    return cfg, model, codec, build_pipeline(cfg, codec).step("secure-sum")


def train_seconds(cfg, model, reps: int) -> list[float]:
    """Wall time of ``reps`` record-level DP-SGD client updates, after one untimed warm-up."""
    from client.train import encode_pairs, train_local

    words = "status ok next deploy the cache team notes soup harbour meeting draft".split()
    rng = np.random.default_rng(0)
    # 30 records of ~max-len tokens, sampled as the default config samples a user's store.
    pairs = [(f"Write note {i} about {words[i % len(words)]}.", " ".join(rng.choice(words, 40))) for i in range(30)]
    data = encode_pairs(model.tokenizer, pairs, cfg.train.max_len)
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(reps + 1):
            t0 = time.perf_counter()
            train_local(model, data, cfg.train, None, None)
            if i:
                times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------- measurement


def deep_nbytes(obj, seen: set[int] | None = None) -> int:
    """Bytes held by ``obj`` and everything it references (containers, bytes, numpy buffers, object fields)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, np.ndarray):
        return size if obj.base is None else size + deep_nbytes(obj.base, seen)
    if isinstance(obj, dict):
        return size + sum(deep_nbytes(k, seen) + deep_nbytes(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(deep_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return size + deep_nbytes(vars(obj), seen)
    return size


def traced_peak(server, method: str) -> int:
    """Peak bytes of Python allocations that ``server.method()`` makes, run on a deep copy (untimed)."""
    shadow = copy.deepcopy(server)
    tracemalloc.start()
    out = getattr(shadow, method)()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out, shadow
    return peak


class _Wire:
    """Serialised sizes of stage messages, as the ServerApp and ClientApp put them in a Message."""

    def __init__(self) -> None:
        from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

        from common.wire import MASKED, SECAGG, reply_nbytes

        self._config = lambda m: reply_nbytes(RecordDict({SECAGG: ConfigRecord(dict(m))}))
        self._masked = lambda y: reply_nbytes(RecordDict({"arrays": ArrayRecord({MASKED: Array(y)})}))
        self._arrays = lambda arrays: reply_nbytes(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()})}))
        self._masked_size: int | None = None

    def config(self, msg) -> int:
        return self._config(msg)

    def masked(self, y: np.ndarray) -> int:
        # Every masked reply has the same dtype and shape: serialise one.
        if self._masked_size is None:
            self._masked_size = self._masked(y)
        return self._masked_size

    def arrays(self, arrays) -> int:
        return self._arrays(arrays)


def mask_expansion_seconds(params, reps: int = 3) -> float:
    """One client's k + 1 mask expansions (self mask and one per neighbour) at the session's length."""
    from common.secagg_crypto import MaskExpander

    prg = MaskExpander(params.vector_len, params.modulus_bits)
    acc = np.zeros(params.vector_len, params.codec.dtype)
    seeds = [os.urandom(32) for _ in range(params.neighbours + 1)]
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for s in seeds:
            prg.add(acc, s, +1)
        best = min(best, time.perf_counter() - t0)
    return best


def run_round(params, wire: _Wire) -> dict:
    """Every stage between ``len(params.node_ids)`` stateless clients and one server; returns the measurements."""
    from common.secagg import SecAggClient, SecAggServer

    ids = params.node_ids
    pid = {nid: i for i, nid in enumerate(ids)}
    n, length = len(ids), params.vector_len
    client_s = defaultdict(lambda: defaultdict(float))  # stage -> node -> seconds
    sent, received = defaultdict(list), defaultdict(list)  # stage -> per-client bytes
    server_s: dict[str, float] = defaultdict(float)
    retained, peaks = {}, {}

    # The graph every party derives from the setup message: one cold draw, then cached in this process.
    t0 = time.perf_counter()
    params.neighbours_of(ids[0])
    graph_s = time.perf_counter() - t0

    server = SecAggServer(params)

    def serve(stage: str, method: str, *args):
        t0 = time.perf_counter()
        out = getattr(server, method)(*args)
        server_s[stage] += time.perf_counter() - t0
        return out

    def on_client(stage: str, nid: int, fn):
        t0 = time.perf_counter()
        out = fn()
        client_s[stage][nid] += time.perf_counter() - t0
        return out

    states: dict[int, dict] = {}

    def resume(nid: int) -> SecAggClient:
        return SecAggClient.from_state(states[nid])

    def config_stage(stage: str, server_method: str, msgs: dict, client_call) -> None:
        """A stage whose messages and replies are config records: each reply reaches the server as it comes."""
        for nid in list(msgs):
            m = msgs.pop(nid)
            reply = on_client(stage, nid, lambda nid=nid, m=m: client_call(nid, m))
            received[stage].append(wire.config(m))
            sent[stage].append(wire.config(reply))
            serve(stage, server_method, nid, reply)
        retained[stage] = deep_nbytes(server)

    def share(nid: int, m: dict) -> dict:
        c = resume(nid)
        reply = c.share_keys(m)
        states[nid] = c.to_state()
        return reply

    def unmask(nid: int, m: dict) -> dict:
        reply = resume(nid).unmask(m)
        del states[nid]  # the round is over for this client
        return reply

    # stage 0: setup and key advertisement
    peaks["setup"] = traced_peak(server, "setup_message")
    setup = serve("setup", "setup_message")
    setup_bytes = wire.config(setup)
    for nid in ids:
        def advertise(nid=nid):
            c = SecAggClient(nid, setup)
            reply = c.advertise_keys()
            states[nid] = c.to_state()
            return reply

        reply = on_client("setup", nid, advertise)
        received["setup"].append(setup_bytes)
        sent["setup"].append(wire.config(reply))
        serve("setup", "receive_keys", nid, reply)
    retained["setup"] = deep_nbytes(server)

    # stage 1: key sharing
    peaks["share_keys"] = traced_peak(server, "share_keys_messages")
    config_stage("share_keys", "receive_shares", serve("share_keys", "share_keys_messages"), share)

    # stage 2: masked input (rides on the train message and its reply); the plain sum is the reference
    peaks["masked_input"] = traced_peak(server, "masked_input_messages")
    msgs = serve("masked_input", "masked_input_messages")
    plain = np.zeros(length)
    plain_s = 0.0
    for nid in list(msgs):
        m = msgs.pop(nid)
        x = client_vector(pid[nid], length)
        t0 = time.perf_counter()
        np.add(plain, x, out=plain)
        plain_s += time.perf_counter() - t0

        def mask(nid=nid, m=m, x=x):
            c = resume(nid)
            y = c.masked_input(m, x)
            states[nid] = c.to_state()
            return y

        y = on_client("masked_input", nid, mask)
        received["masked_input"].append(wire.config(m))
        sent["masked_input"].append(wire.masked(y))
        serve("masked_input", "receive_masked_input", nid, y)
        del x, y
    retained["masked_input"] = deep_nbytes(server)

    # stage 3: unmasking
    peaks["unmask"] = traced_peak(server, "unmask_messages")
    config_stage("unmask", "receive_unmask", serve("unmask", "unmask_messages"), unmask)
    peaks["finalize"] = traced_peak(server, "finalize")
    result = serve("finalize", "finalize")

    per_client = {s: statistics.mean(client_s[s].values()) for s in STAGES}
    return {
        "n": n,
        "k": params.neighbours,
        "t": params.threshold,
        "length": length,
        "graph_s": graph_s,
        "client_stage_s": per_client,
        "client_total_s": [sum(client_s[s][nid] for s in STAGES) for nid in ids],
        "server_stage_s": dict(server_s),
        "server_s": sum(server_s.values()),
        "plain_sum_s": plain_s,
        "retained_bytes": retained,
        "peak_bytes": peaks,
        "server_peak_bytes": max(retained.get(prev, 0) + peaks[s] for prev, s in zip(("",) + STAGES, STAGES + ("finalize",))),
        "sent": {s: statistics.mean(v) for s, v in sent.items()},
        "received": {s: statistics.mean(v) for s, v in received.items()},
        "max_abs_err": float(np.abs(result.sum - plain).max()),
        "bound": params.codec.error_bound(n),
        "survivors": len(result.survivors),
    }


def ratios(r: dict, train_s: float) -> dict:
    """The three overhead ratios of the docstring, each device and the server paying one graph draw."""
    n = r["n"]
    client = statistics.mean(r["client_total_s"]) + r["graph_s"]
    server = r["server_s"] + r["graph_s"]
    return {
        "client_secagg_s": client,
        "server_secagg_s": server,
        "round": (n * (train_s + client) + server) / (n * train_s + r["plain_sum_s"]),
        "device": (train_s + client) / train_s,
        "latency": (train_s + client + server) / (train_s + r["plain_sum_s"]),
    }


# ------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=str, default=None, help="comma-separated N values (default 100,1000)")
    ap.add_argument("--length", type=int, default=None, help="masked vector length (default: the real K-slot reply's)")
    ap.add_argument("--train-reps", type=int, default=None, help="timed training calls after a warm-up (default 5; 1 with --quick or --smoke)")
    add_set_flag(ap, "the deployed run (e.g. adapter-layers=2: its reply length and its training)")
    add_size_flags(ap, quick="N = 100 at 1/10 of the real length, 1 training call (< 1 min)")
    args = ap.parse_args(argv)
    model_name = "tiny-random" if args.smoke else "smollm2-135m"
    sizes = [int(s) for s in (args.clients or ("12" if args.smoke else "100" if args.quick else "100,1000")).split(",")]
    reps = args.train_reps or (1 if args.smoke or args.quick else 5)

    cfg, model, codec, secure_sum = deployed(model_name, parse_sets(args.sets))
    length = args.length or (codec.length // 10 if args.quick else codec.length)
    wire = _Wire()
    plain_reply = wire.arrays(codec.unflatten(client_vector(0, codec.length)))
    train = train_seconds(cfg, model, reps)
    train_s = statistics.median(train)
    print(f"model {model_name}: K-slot reply {codec.length:,} values ({plain_reply:,} bytes as float32); "
          f"masked length here {length:,}; train_local {[round(t, 2) for t in train]} s, median {train_s:.3f} s", flush=True)

    rows = {}
    for n in sizes:
        # Flower-like random 63-bit node ids: their varints set the size of the id lists in the messages.
        node_ids = sorted({int(i) for i in np.random.default_rng(n).integers(1, 2**63, n)})
        params = secure_sum.params(node_ids)  # a fresh session: its graph is not drawn yet
        if length != params.vector_len:
            params = dataclasses.replace(params, vector_len=length)
        t0 = time.perf_counter()
        r = run_round(params, wire)
        r["wall_s"] = time.perf_counter() - t0
        r["expand_s"] = mask_expansion_seconds(params)
        r.update(ratios(r, train_s))
        rows[n] = r
        print(f"N={n} done in {r['wall_s']:.1f} s", flush=True)

    mb = 1e6
    print()
    print(f"secure aggregation at scale: one process, deployed parameters, masked length {length:,}, train {train_s:.3f} s/client")
    hdr = (f"{'N':>5} {'k':>4} {'t':>4} | {'graph':>6} {'client':>7} {'of which masks':>14} {'server':>7} {'unmask+fin':>10} "
           f"{'srv peak MB':>11} | {'sent MB':>8} {'recv MB':>8} | {'round':>6} {'device':>6} {'latency':>7} | {'max err':>8}")
    print(hdr)
    print("-" * len(hdr))
    for n, r in rows.items():
        unmask = r["server_stage_s"]["unmask"] + r["server_stage_s"]["finalize"]
        print(f"{n:>5} {r['k']:>4} {r['t']:>4} | {r['graph_s']:>6.2f} {r['client_secagg_s']:>7.3f} {r['expand_s']:>14.3f} "
              f"{r['server_secagg_s']:>7.2f} {unmask:>10.2f} {r['server_peak_bytes'] / mb:>11.1f} | "
              f"{sum(r['sent'].values()) / mb:>8.3f} {sum(r['received'].values()) / mb:>8.3f} | "
              f"{r['round']:>6.3f} {r['device']:>6.3f} {r['latency']:>7.3f} | {r['max_abs_err']:>8.1e}")
    print("(seconds; client = mean per client over all stages incl. state save/restore + one graph draw; "
          "server incl. one graph draw; unmask+fin = server's unmask stage + finalize)")
    for n, r in rows.items():
        print(f"N={n}: client per stage (s) " + ", ".join(f"{s} {v:.4f}" for s, v in r["client_stage_s"].items())
              + f"; client total min/max {min(r['client_total_s']):.3f}/{max(r['client_total_s']):.3f}")
        print(f"N={n}: server per stage (s) " + ", ".join(f"{s} {v:.3f}" for s, v in r["server_stage_s"].items())
              + f"; plain sum {r['plain_sum_s']:.3f}")
        print(f"N={n}: server retained MB " + ", ".join(f"{s} {v / mb:.2f}" for s, v in r["retained_bytes"].items())
              + "; call peaks MB " + ", ".join(f"{s} {v / mb:.2f}" for s, v in r["peak_bytes"].items()))
        print(f"N={n}: bytes per client sent " + ", ".join(f"{s} {v:,.0f}" for s, v in r["sent"].items())
              + "; received " + ", ".join(f"{s} {v:,.0f}" for s, v in r["received"].items())
              + f" (plain train reply {plain_reply:,})")
        print(f"N={n}: max |secure sum - plain sum| {r['max_abs_err']:.2e} (bound {r['bound']:.2e}), survivors {r['survivors']}/{n}")

    res: dict = {"model": model_name, "length": length, "train_s": round(train_s, 3)}
    for n, r in rows.items():
        unmask = r["server_stage_s"]["unmask"] + r["server_stage_s"]["finalize"]
        res.update({
            f"n{n}_k": r["k"],
            f"n{n}_round_ratio": round(r["round"], 4),
            f"n{n}_device_ratio": round(r["device"], 4),
            f"n{n}_latency_ratio": round(r["latency"], 4),
            f"n{n}_client_s": round(r["client_secagg_s"], 4),
            f"n{n}_graph_s": round(r["graph_s"], 3),
            f"n{n}_server_s": round(r["server_secagg_s"], 3),
            f"n{n}_unmask_s": round(unmask, 3),
            f"n{n}_server_peak_mb": round(r["server_peak_bytes"] / mb, 2),
            f"n{n}_sent_bytes": round(sum(r["sent"].values())),
            f"n{n}_recv_bytes": round(sum(r["received"].values())),
            f"n{n}_max_abs_err": f"{r['max_abs_err']:.2e}",
        })
    res["plain_reply_bytes"] = plain_reply
    print(result_line("secagg_scale", res), flush=True)
    return {**res, "rows": rows}


if __name__ == "__main__":
    main()
