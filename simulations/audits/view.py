"""What the audits may look at in a finished simulation run, and the model views they attack.

A simulation holds every device on one machine, so the audit harness can play
both the attacker and the ground truth:

* the **harness's config** (``config.json``): the run config and where every
  device keeps its raw file and its store (never the server's report);
* the **server's view**: the final shared tiers (``shared-tiers.safetensors``:
  global + persona slots), what an honest-but-curious server holds;
* each **device's view**: its store (scrubbed data, private user tier, the
  persona slot it chose, its accountant), what a personalised model on the
  device holds; and what the harness read from the stores into ``report.json``
  (per-user scores and reported epsilon);
* the generator's **ground truth**, when the data was generated:
  ``manifest.json`` (personas, canaries, the one-run audit canaries with
  their inclusion coins, hold-out users) and
  ``pii_sidecar.jsonl`` (planted PII). A run on a user's own data has neither;
  :attr:`RunView.manifest` and :attr:`RunView.sidecar` are then None and the
  audits that need them skip.

Paths the harness recorded under the run folder are re-rooted under the folder
the view was opened on, so a moved or copied run still reads its own files.

Model stacks (active adapters): ``base`` (no adapters), ``global``,
``persona`` (global + the device's chosen slot), ``personal`` (global +
persona + user tier and soft prompt).

The personal stack exists only on its device, so inside :meth:`RunView.device`
it is scored and generated from as the device serves it: with the device's
released context phrases before the prompt (client/context.py; the phrases are
one more output of its DP mechanism). The base and shared stacks are the
server's view and stay bare, as the server never holds a device's phrases.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch

STACKS = {"base": (), "global": ("global",), "persona": ("global", "persona"), "personal": ("global", "persona", "user")}
MANIFEST, SIDECAR = "manifest.json", "pii_sidecar.jsonl"


class RunView:
    head: str = ""  # the open device's context phrases as a prompt prefix ('' outside device())

    def __init__(self, run_dir: Path):
        from common.config import RunConfig
        from simulations.run import read_harness

        self.run_dir = Path(run_dir)
        self.harness = read_harness(self.run_dir)
        self.config = dict(self.harness["run"])  # the flat run config (kebab-case keys)
        self.cfg = RunConfig.from_flat(self.config)
        self.report = json.loads((self.run_dir / "report.json").read_text())
        self.data_dir = self.locate(self.harness["data_dir"])
        manifest = self.data_dir / MANIFEST
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else None
        sidecar = self.data_dir / SIDECAR
        self.sidecar = [json.loads(line) for line in sidecar.read_text().splitlines() if line.strip()] if sidecar.is_file() else None
        self.max_len = self.cfg.train.max_len
        self.num_slots = self.cfg.persona.slots
        self._raw: dict[str, list[dict]] = {}

    def locate(self, recorded: str | None) -> Path | None:
        """A path from ``config.json``, re-rooted under this run folder if it lay under the run's own folder."""
        if recorded is None:
            return None
        path = Path(recorded)
        try:
            return self.run_dir / path.relative_to(Path(self.config["run-dir"]))
        except ValueError:
            return path  # outside the run folder (a user's own data): as recorded

    # -- who is who ---------------------------------------------------------------
    @cached_property
    def participants(self) -> list[dict]:
        """The federation's devices (from ``config.json``), with the generator's ground truth for each where known."""
        truth = {u["user_id"]: u for u in (self.manifest or {}).get("users", [])}
        return [
            {
                **truth.get(dev["user_id"], {}),
                "user_id": dev["user_id"],
                "user_index": dev["partition"],
                "user_file": self.locate(dev["user_file"]),
                "store": self.locate(dev["store"]),
            }
            for dev in self.harness["devices"]
        ]

    @cached_property
    def holdouts(self) -> list[dict]:
        """Users the generator wrote but the federation never saw (their stores live apart, made on first use)."""
        folder = self.locate(self.harness["holdout_devices_dir"])
        users = [u for u in (self.manifest or {}).get("users", []) if u.get("holdout")]
        return [
            {**u, "user_file": self.data_dir / u["file"], "store": folder / f"{Path(u['file']).stem}.sqlite"}
            for u in users
        ]

    @property
    def canaried(self) -> list[dict]:
        return [u for u in self.participants if u.get("canary")]

    @property
    def wire_dir(self) -> Path | None:
        return self.locate(self.harness.get("wire_dir"))

    def pii_record_ids(self, user: dict) -> set[str]:
        """Ids of the user's records whose raw text held planted PII (empty without a sidecar)."""
        return {row["record_id"] for row in self.sidecar or [] if row["user_id"] == user["user_id"]}

    def planted_values(self) -> list[str]:
        """Every planted PII value and canary (empty when the run has no planted ground truth)."""
        values = {row["value"] for row in self.sidecar or []} | {u["canary"] for u in self.canaried}
        return sorted(values)

    def reported(self) -> dict[int, dict]:
        """``report.json``'s per-user rows (what the harness read from each store), by user index."""
        return {u["user_index"]: u for u in self.report["users"]}

    def raw_records(self, user: dict) -> list[dict]:
        """The user's raw JSONL (ground truth; only the harness reads it, never a model).

        Read once per user: every audit walks the same records.
        """
        key = str(user["user_file"])
        if key not in self._raw:
            text = Path(user["user_file"]).read_text()
            self._raw[key] = [json.loads(line) for line in text.splitlines() if line.strip()]
        return self._raw[key]

    # -- model states ---------------------------------------------------------------
    @cached_property
    def model(self):
        from common.models import AdapterSpec, personal_model

        return personal_model(AdapterSpec.from_config(self.cfg))

    @cached_property
    def tokenizer(self):
        return self.model.tokenizer

    @cached_property
    def _shared(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        from server.report import SHARED_TIERS_FILE

        path = self.run_dir / SHARED_TIERS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} missing: the server saved no shared tiers; re-run the simulation")
        return load_file(str(path))

    def _open_store(self, user: dict):
        from client import device
        from client.store import DeviceStore
        from simulations.run import device_policy

        path = Path(user["store"])
        if path.is_file():
            return DeviceStore(path)
        if not user.get("holdout"):
            raise FileNotFoundError(f"{path}: device {user['user_index']} has no store (it never ran)")
        # A hold-out user becomes a device only here, with the policy the harness gives every device.
        return device.open_store(self.cfg, device_policy(self.cfg, Path(user["user_file"]), path), {})

    @contextmanager
    def device(self, user: dict):
        """Load ``user``'s full state (shared tiers, chosen slot, user tier) into the model.

        A hold-out user never trained: it gets the initial user tier and, like
        any device, the slot it picks on its own data (the server's view of a
        non-member). Yields the device store.
        """
        from client import device
        from client.persona import CHOICE_STATE, pick_and_load
        from client.train import encode_pairs
        from common.kslot import KSlotCodec

        model = self.model
        store = self._open_store(user)
        codec = KSlotCodec.from_tensors(model.shared_params(), self.num_slots)
        direct, slots, centroids = codec.split_received(self._shared)
        model.load_trainable(direct)
        device.swap_in_user(model, store)
        if slots:
            choice = device.get_json(store, CHOICE_STATE, {}).get("evaluate", {})
            if choice:
                model.load_trainable(slots[int(choice[max(choice, key=int)])])
            else:
                data = encode_pairs(self.tokenizer, store.tasks("train"), self.max_len)
                rows = None if centroids is None else centroids.numpy()
                pick_and_load(model, slots, rows, data, self.cfg, store, 0, "audit")
        self.head = self._context_head(store)
        try:
            yield store
        finally:
            self.head = ""
            model.reset_to_initial()
            model.use(*model.tiers)

    def _context_head(self, store) -> str:
        """The device's released context phrases as served (client.app.evaluate); '' before it released any."""
        from client import context as in_context
        from client import device

        return in_context.prefix(device.served_phrases(store, self.cfg))

    def _served_head(self, stack: str) -> str:
        return self.head if stack == "personal" else ""

    # -- measurements -------------------------------------------------------------
    def _adapters(self, stack: str) -> tuple[str, ...]:
        """The adapters of a stack in this run (a run without the persona tier has no persona adapter)."""
        return STACKS[stack] if self.num_slots else tuple(a for a in STACKS[stack] if a != "persona")

    @torch.no_grad()
    def record_nll(self, pairs: list[tuple[str, str]], stack: str, batch_size: int = 32) -> list[float]:
        """Mean NLL per target token of each (input, output) pair under a model stack."""
        from client.train import encode_pairs, trim_batch

        if not pairs:
            return []
        model = self.model
        adapters = self._adapters(stack)
        model.use(*adapters)
        model.eval()
        data = encode_pairs(self.tokenizer, pairs, self.max_len, context=self._served_head(stack))
        out = []
        for i in range(0, len(data), batch_size):
            ids, att, lab = trim_batch(*data[i : i + batch_size])
            s, c = model(ids, att, lab)
            out += (s / c.clamp(min=1)).tolist()
        model.use(*model.tiers)
        return out

    @torch.no_grad()
    def generate(self, prompt: str, stack: str, max_new_tokens: int = 24) -> str:
        """Greedy continuation of ``prompt`` (the task format: ``input\\n``) under a stack.

        :meth:`PersonalLM.generate`, KV-cached: the soft prompt, when the stack
        includes the user tier, goes in once; decoding stops at the end-of-text token.
        The personal stack's prompt starts with the open device's context phrases (module docstring).
        """
        model = self.model
        model.use(*self._adapters(stack))
        model.eval()
        ids = self.tokenizer(self._served_head(stack) + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        eos = self.tokenizer.eos_token_id
        new = model.generate(ids, torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)[0].tolist()
        model.use(*model.tiers)
        return self.tokenizer.decode(new, skip_special_tokens=True)
