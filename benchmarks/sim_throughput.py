"""Simulation throughput: a naive Flower ClientApp vs fedpersona, the same work (issue #15).

One invocation runs N clients x R rounds x S record-level DP-SGD steps at
batch B and sequence length L twice, on the same per-user data, and scores
both results the same way: the mean NLL per target token on every client's
held-out test tasks (token-weighted over clients).

* **naive**: the FlowerTune pattern. A plain Message-API ``ClientApp``
  (``@app.train``, ``@app.evaluate``) that on *every* call loads the base
  model (``common.models.load_base_model``), wraps it with peft LoRA on
  ``q_proj,v_proj`` of every layer (rank 8, alpha 16), reads the user's raw
  JSONL (``client.jsonl`` parses it, no scrubbing), tokenises its tasks as
  fedpersona does (``client.train.encode_pairs``), makes the model private
  with Opacus ``PrivacyEngine.make_private`` (RDP accountant, Poisson
  sampling, noise multiplier 1.0, max grad norm 1.0), trains S steps with Adam
  (fedpersona's default lr for Adam) and returns the LoRA weights and its epsilon, as
  Flower's Opacus example does; evaluation rebuilds the model the same way. A
  minimal ``ServerApp`` loop averages with Flower's ``FedAvg``
  (``configure_train`` / ``aggregate_train``) and evaluates once after the
  last round, as fedpersona's server does.
* **fedpersona**: ``simulations.run.prepare`` + ``simulate`` (the real
  ServerApp and ClientApp) with num-supernodes, num-server-rounds,
  local-steps, batch-size and max-len set to N, R, S, B, L and every other
  setting at its default: secure aggregation, the persona tier, FFA-LoRA,
  per-device noise calibrated to the target epsilon, Presidio scrubbing of
  every record on ingestion (only ``--smoke`` asks for pattern-only
  scrubbing), and an evaluation of four tier stacks per device. Where N is
  below the default persona-slots or num-personas these are lowered to N
  (the config requires it). Its NLL is the report's "served" utility (each
  user's routing-group stack); the global tier's is printed too.

Both arms run on Flower's simulation engine (Ray) with one client at a time
using every core (``num_cpus = os.cpu_count()``) and the same data files (the
dataset ``prepare`` generates, read raw by the naive clients). The base model
is loaded once before either arm (untimed) so that neither pays the one-off
GGUF conversion or a cold file cache. Each arm's wall clock is
``time.perf_counter`` around its simulation call only; a client update is a
train reply that trained (naive: successful train replies; fedpersona: the
server report's per-round "contributors").

    python -m benchmarks.sim_throughput            # SmolLM2-135M, N 20, R 2, S 2, B 6, L 56
    python -m benchmarks.sim_throughput --quick    # SmolLM2-135M, N 4, R 1 (minutes per arm on two cores)
    python -m benchmarks.sim_throughput --smoke    # tiny random model, N 3, R 1, S 1 (seconds; figures meaningless)

(``--smoke`` uses 3 clients, not 2: fedpersona's secure aggregation needs at least 3.)

Last line: ``RESULT sim_throughput naive_updates_per_min=... fedpersona_updates_per_min=... speedup=...
naive_nll=... fedpersona_nll=... clients=N rounds=R steps=S batch=B seq=L``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "1"}.items():
    os.environ.setdefault(_key, _value)

from benchmarks._common import add_set_flag, add_size_flags, parse_sets, result_line  # noqa: E402

# The naive client's LoRA and DP-SGD settings (the FlowerTune / Flower Opacus examples' pattern).
LORA_RANK, LORA_ALPHA, LORA_TARGETS = 8, 16, ("q_proj", "v_proj")
NOISE_MULTIPLIER, MAX_GRAD_NORM, DELTA = 1.0, 1.0, 1e-5
EVAL_BATCH = 16  # as client.train.evaluate_nll


# ------------------------------------------------------------------ naive arm


def read_tasks(path: str) -> dict[str, list[tuple[str, str]]]:
    """(input, output) of the user's train and test tasks, in file order, raw (no scrubbing).

    The store's reader without the store: the same line parser and validator
    (``client.jsonl.records``); tasks over the length limit are skipped, as the
    store quarantines them.
    """
    from client.jsonl import records

    out: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    with open(path, "rb") as f:
        for _, rec in records(Path(path), f, 0, 0, os.fstat(f.fileno()).st_size):
            if rec is not None and rec["kind"] == "task" and "too_long" not in rec:
                out[rec["split"]].append((rec["input"], rec["output"]))
    return out


def build_lora_model(model_name: str):
    """A fresh base model with fresh LoRA adapters (what the naive client does on every call)."""
    from peft import LoraConfig, get_peft_model

    from common.models import load_base_model

    base, tok = load_base_model(model_name)
    base.to("cpu")  # on its device before get_peft_model (opacus#820)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(base, config), tok


def lora_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


def batch_nll(net, input_ids, attention, labels):
    """Per-sample (target-token NLL sum, target-token count) from the model's full logits."""
    import torch

    from client.train import trim_batch
    from common.models import per_sample_nll

    input_ids, attention, labels = trim_batch(input_ids, attention, labels)
    positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape[0], -1)
    logits = net(input_ids=input_ids, attention_mask=attention, position_ids=positions).logits
    return per_sample_nll(logits, labels)


def dp_train(model, data, steps: int, batch: int, lr: float) -> tuple[float, float]:
    """Opacus DP-SGD on the LoRA weights: ``steps`` Poisson-sampled steps with Adam; (mean loss, epsilon)."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    loader = DataLoader(data, batch_size=min(batch, len(data)), shuffle=True)
    engine = PrivacyEngine(accountant="rdp")
    net, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                 noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                                                 poisson_sampling=True)
    done, losses = 0, []
    while done < steps:
        for input_ids, attention, labels in loader:
            if done >= steps:
                break
            optimizer.zero_grad(set_to_none=True)
            if len(input_ids) == 0:  # an empty Poisson batch: Opacus' noise-only step
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            else:
                nll_sum, count = batch_nll(net, input_ids, attention, labels)
                loss = (nll_sum / count.clamp(min=1)).mean()
                loss.backward()
                losses.append(loss.item())
            optimizer.step()
            done += 1
    return (sum(losses) / len(losses) if losses else float("nan")), float(engine.get_epsilon(delta=DELTA))


def naive_apps(model_name: str, user_files: list[str], rounds: int, steps: int, batch: int, seq: int, lr: float, out: dict):
    """The naive ServerApp and ClientApp; the server thread fills ``out`` (same process as the simulation)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        from peft import set_peft_model_state_dict

        from client.train import encode_pairs

        model, tok = build_lora_model(model_name)
        set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
        data = encode_pairs(tok, read_tasks(user_files[int(context.node_config["partition-id"])])["train"], seq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' secure-RNG warning, torch's backward-hook notice
            loss, epsilon = dp_train(model, data, steps, batch, lr)
        metrics = {"num-examples": len(data), "train-loss": loss, "epsilon": epsilon}
        return Message(content=RecordDict({"arrays": ArrayRecord(lora_state(model)), "metrics": MetricRecord(metrics)}), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        import torch
        from peft import set_peft_model_state_dict

        from client.train import encode_pairs

        model, tok = build_lora_model(model_name)
        set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
        data = encode_pairs(tok, read_tasks(user_files[int(context.node_config["partition-id"])])["test"], seq)
        model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(data), EVAL_BATCH):
                nll_sum, count = batch_nll(model, *data[i : i + EVAL_BATCH])
                total += nll_sum.sum().item()
                tokens += int(count.sum().item())
        metrics = {"nll-sum": total, "num-tokens": tokens, "num-examples": len(data)}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        import torch

        n = len(user_files)
        strategy = FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
        torch.manual_seed(0)
        arrays = ArrayRecord(lora_state(build_lora_model(model_name)[0]))
        for server_round in range(1, rounds + 1):
            replies = list(grid.send_and_receive(strategy.configure_train(server_round, arrays, ConfigRecord(), grid)))
            out["updates"] += sum(not m.has_error() for m in replies)
            out["failed"] += sum(m.has_error() for m in replies)
            new, _ = strategy.aggregate_train(server_round, replies)
            if new is not None:
                arrays = new
        replies = list(grid.send_and_receive(strategy.configure_evaluate(rounds, arrays, ConfigRecord(), grid)))
        scored = [m.content["metrics"] for m in replies if not m.has_error()]
        out["evaluated"] = len(scored)
        tokens = sum(int(s["num-tokens"]) for s in scored)
        out["nll"] = sum(float(s["nll-sum"]) for s in scored) / tokens if tokens else float("nan")

    return server_app, client_app


def run_naive(model_name: str, user_files: list[str], rounds: int, steps: int, batch: int, seq: int, lr: float) -> dict:
    from flwr.simulation import run_simulation

    from simulations.run import simulation_backend

    out = {"updates": 0, "failed": 0, "evaluated": 0, "nll": float("nan")}
    server_app, client_app = naive_apps(model_name, user_files, rounds, steps, batch, seq, lr, out)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(user_files), backend_config=simulation_backend())
    out["wall_s"] = time.perf_counter() - started
    return out


# ------------------------------------------------------------------------ main


def _per_min(updates: int, wall_s: float) -> float:
    return updates / wall_s * 60 if wall_s > 0 else float("nan")


def main(argv=None) -> dict:
    from common.config import DEFAULTS, LEARNING_RATES
    from common.models import load_base_model
    from simulations.run import prepare, simulate

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: smollm2-135m; tiny-random with --smoke)")
    ap.add_argument("--clients", type=int, default=None, help="N (default 20; 4 with --quick, 3 with --smoke; at least 3)")
    ap.add_argument("--rounds", type=int, default=None, help="R (default 2; 1 with --quick or --smoke)")
    ap.add_argument("--steps", type=int, default=None, help="S, DP-SGD steps per client update (default 2; 1 with --smoke)")
    ap.add_argument("--batch", type=int, default=6, help="B (default 6)")
    ap.add_argument("--seq", type=int, default=56, help="L, max tokens per example (default 56)")
    add_set_flag(ap, "fedpersona's arm (e.g. adapter-layers=2)")
    add_size_flags(ap, quick="SmolLM2, N 4, R 1 (minutes per arm on two cores)")
    args = ap.parse_args(argv)
    model, n, rounds, steps = "smollm2-135m", 20, 2, 2
    if args.quick:
        n, rounds = 4, 1
    if args.smoke:
        model, n, rounds, steps = "tiny-random", 3, 1, 1
    model = args.model or model
    n, rounds, steps = args.clients or n, args.rounds or rounds, args.steps or steps
    batch, seq = args.batch, args.seq
    if n < 3:
        raise SystemExit("--clients must be at least 3 (fedpersona's secure aggregation needs 3)")

    overrides = {"model": model, "num-supernodes": n, "num-server-rounds": rounds, "local-steps": steps,
                 "batch-size": batch, "max-len": seq}
    for key in ("persona-slots", "num-personas"):
        if DEFAULTS[key] > n:
            overrides[key] = n  # the config requires at most one slot (and persona) per client
    if args.smoke:
        overrides["scrub-mode"] = "patterns"
    overrides.update(parse_sets(args.sets))
    lr = DEFAULTS["lr"] or LEARNING_RATES["adam"]  # the naive arm trains with Adam, as Flower's Opacus example does

    with tempfile.TemporaryDirectory(prefix="sim-throughput-") as tmp:
        harness = prepare("default", overrides, Path(tmp) / "fedpersona")
        user_files = [d["user_file"] for d in harness["devices"]]
        load_base_model(model)  # untimed: the one-off GGUF conversion and a warm file cache, for both arms
        print(f"model {model}: {n} clients x {rounds} rounds x {steps} DP-SGD steps, batch {batch}, seq {seq}; "
              f"fedpersona overrides {overrides}", flush=True)

        naive = run_naive(model, user_files, rounds, steps, batch, seq, lr)
        print(f"naive: {naive['updates']} updates ({naive['failed']} failed) in {naive['wall_s']:.1f} s, "
              f"{_per_min(naive['updates'], naive['wall_s']):.2f} updates/min; held-out NLL {naive['nll']:.4f} "
              f"(global LoRA, {naive['evaluated']} clients evaluated)", flush=True)

        started = time.perf_counter()
        report = simulate(harness)
        fed_wall = time.perf_counter() - started

    fed_updates = sum(r["contributors"] for r in report["server"]["rounds"])
    u = report["utility"]
    print(f"fedpersona: {fed_updates} updates in {fed_wall:.1f} s, {_per_min(fed_updates, fed_wall):.2f} updates/min; "
          f"held-out NLL served {u['served']['nll']:.4f} (global {u['global']['nll']:.4f}, personal {u['personal']['nll']:.4f}, "
          f"base {u['base']['nll']:.4f}; {u['users']} of {u['users_total']} devices evaluated)", flush=True)
    naive_rate, fed_rate = _per_min(naive["updates"], naive["wall_s"]), _per_min(fed_updates, fed_wall)
    speedup = fed_rate / naive_rate if naive_rate > 0 else float("nan")
    print(f"fedpersona / naive: {speedup:.2f}x client updates per minute; NLL: fedpersona 'served' vs naive global LoRA", flush=True)

    def fmt(x: float, spec: str) -> str:
        return format(x, spec) if math.isfinite(x) else "nan"

    res = {
        "naive_updates_per_min": fmt(naive_rate, ".2f"),
        "fedpersona_updates_per_min": fmt(fed_rate, ".2f"),
        "speedup": fmt(speedup, ".2f"),
        "naive_nll": fmt(naive["nll"], ".4f"),
        "fedpersona_nll": fmt(u["served"]["nll"], ".4f"),
        "clients": n,
        "rounds": rounds,
        "steps": steps,
        "batch": batch,
        "seq": seq,
    }
    print(result_line("sim_throughput", res), flush=True)
    return {**res, "naive_wall_s": naive["wall_s"], "fedpersona_wall_s": fed_wall}


if __name__ == "__main__":
    main()
