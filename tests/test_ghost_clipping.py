"""Opacus ghost clipping against hooks mode on the device's model (benchmarks/ghost_clipping.py)."""

from __future__ import annotations

import pytest

from helpers import spec

from benchmarks.ghost_clipping import compare
from client.train import encode_pairs, trim_batch
from common.models import PersonalLM

PAIRS = [(f"Write note {i}.", f"status ok next deploy {i} the cache team notes") for i in range(4)]
TOL = 1e-4


@pytest.fixture(scope="module", params=["ffa", "separate"])
def check(request):
    # A model of its own: the process-wide one (personal_model) may carry another
    # test's hooks-mode wrapper, and Opacus refuses to hook a model twice.
    model = PersonalLM(spec(lora_split=request.param))
    model.use(*model.tiers)
    model.train()
    ids, mask, labels = trim_batch(*encode_pairs(model.tokenizer, PAIRS, 32).tensors)
    return compare(model, ids, mask, labels)


def test_ghost_per_sample_norms_equal_hooks_mode_norms(check):
    assert check["norm_rel_err"] < TOL
    kinds = {k for k in check if k.endswith("_norm_rel_err") and k != "norm_rel_err"}
    assert {"prompt_norm_rel_err", "lora_B_norm_rel_err"} <= kinds
    assert all(check[k] < TOL for k in kinds), {k: check[k] for k in kinds}


def test_ghost_clipped_gradient_equals_hooks_mode_where_clipping_bites(check):
    assert 0 < check["clipped"] < 1  # some samples clipped, some not: the comparison is not vacuous
    assert check["grad_rel_err"] < TOL


def test_ghost_mode_needs_the_workaround_for_the_soft_prompt(check):
    """Opacus 1.6's embedding norm sampler cannot ``view`` the prompt's expanded indices; if this starts to pass, drop the workaround."""
    assert check["ghost_as_is"] == "fails:prompt-embedding-view"


def test_a_plain_backward_under_ghost_mode_is_not_the_clipped_gradient(check):
    """Opacus #732: ghost mode clips only through its criterion; a plain ``loss.backward()`` runs without error and without clipping."""
    assert check["plain_backward_rel_err"] > 0.1
