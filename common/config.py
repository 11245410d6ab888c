"""The run configuration: one typed, frozen :class:`RunConfig`, validated once.

Flower hands every app a flat ``run_config`` of ``kebab-case`` keys
(``pyproject.toml``'s ``[tool.flwr.app.config]`` plus ``--run-config``
overrides; ``fedpersona simulate --set`` in simulation). Both halves build a
:class:`RunConfig` from it with :meth:`RunConfig.from_flat`, which checks every
key's type and range and the rules that tie keys together. A bad value is a
:class:`ConfigError` naming the key and never echoing the value (a value can
be a path or free text).

This module is the only place that holds a default. Each section is a frozen
dataclass; a field's metadata names its flat key and its check.

What the run config decides and what it does not: in deployment the run
config comes from whoever submits the run, so for a device it is a *request*.
The device's own :class:`client.policy.DevicePolicy` bounds it (scrubbing, DP,
noise, clip, budgets, secure aggregation) and owns every device path. The
keys of :class:`ScrubConfig` and :class:`DataConfig` other than ``scrub-mode``
are read only by the simulation harness, which writes them into each
simulated device's policy. Per-round values travel in the message instead
(``common.wire.MESSAGE_CONFIG``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


class ConfigError(ValueError):
    """A configuration key is missing, unknown, mistyped or out of range.

    The message names the key and the rule, never the value.
    """

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"config key '{key}': {reason}")


Check = Callable[[Any], str | None]


def _opt(key: str, default: Any, check: Check | None = None) -> Any:
    return field(default=default, metadata={"key": key, "check": check})


def _at_least(lo: float) -> Check:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def _positive(v: float) -> str | None:
    return None if v > 0 and math.isfinite(v) else "must be a finite number > 0"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 and math.isfinite(v) else "must be a finite number >= 0"


def _open_unit(v: float) -> str | None:
    return None if 0 < v < 1 else "must lie strictly between 0 and 1"


def _fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must lie in (0, 1]"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else "must be one of " + ", ".join(choices)


def _modules(v: str) -> str | None:
    names = [m.strip() for m in v.split(",")]
    return None if all(n.isidentifier() for n in names) else "must be a comma-separated list of module names"


def coerce_value(key: str, value: Any, like: Any) -> Any:
    """``value`` as the type of the default ``like``; strings from a command line are parsed."""
    if isinstance(like, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        # 'False' parsed as a non-empty string once turned secure aggregation *on*.
        raise ConfigError(key, "expected a boolean (true or false)")
    if isinstance(like, int):
        if isinstance(value, bool):
            raise ConfigError(key, "expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, "expected an integer")
    if isinstance(like, float):
        if isinstance(value, bool):
            raise ConfigError(key, "expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, "expected a number")
    if not isinstance(value, str):
        raise ConfigError(key, "expected a string")
    return value


class _Section:
    """Flat-key (de)serialisation shared by every section."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.metadata["key"] for f in fields(cls)]

    @classmethod
    def _from_flat(cls, flat: Mapping[str, Any]):
        values = {}
        for f in fields(cls):
            key, check = f.metadata["key"], f.metadata["check"]
            value = coerce_value(key, flat[key], f.default) if key in flat else f.default
            problem = check(value) if check else None
            if problem:
                raise ConfigError(key, problem)
            values[f.name] = value
        return cls(**values)

    def _flat(self) -> dict[str, Any]:
        return {f.metadata["key"]: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The base model and the shapes of the adapters (both halves derive tensor names from these)."""

    model: str = _opt("model", "smollm2-135m")  # registry name or a local Hugging Face directory
    lora_rank: int = _opt("lora-rank", 8, _at_least(1))
    lora_alpha: int = _opt("lora-alpha", 16, _at_least(1))
    lora_targets: str = _opt("lora-targets", "q_proj,v_proj", _modules)
    user_lora_rank: int = _opt("user-lora-rank", 4, _at_least(1))
    prompt_tokens: int = _opt("prompt-tokens", 4, _at_least(1))
    # 0: LoRA in every layer and the soft prompt at the input. N > 0: every
    # tier's LoRA only in the top N layers and the soft prompt injected at the
    # first of them (a deep prompt); the frozen layers below are then computed
    # once per record and cached (common/models.py, PrefixCache).
    adapter_layers: int = _opt("adapter-layers", 2, _at_least(0))
    # ffa: FFA-LoRA, every A frozen at its seeded init, only B trained and shared
    lora_split: str = _opt("lora-split", "ffa", _one_of("ffa", "separate"))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.lora_targets.split(","))


@dataclass(frozen=True)
class PersonaConfig(_Section):
    """The persona tier: K slots chosen on the device; 0 slots = no persona tier."""

    slots: int = _opt("persona-slots", 4, _at_least(0))
    # random: a slot drawn once from the device's own secret (no data leaves);
    # kmeans: nearest centroid of the device's profile embedding; ifca: lowest loss.
    # kmeans and ifca derive the choice (and kmeans the profile row) from the
    # device's data, so they need user-level DP with noise added by the devices
    # under secure aggregation (see RunConfig.__post_init__).
    assign: str = _opt("persona-assign", "random", _one_of("random", "kmeans", "ifca"))
    # a slot with fewer (noisy) members folds into the global tier that round
    min_size: int = _opt("persona-min-size", 3, _at_least(1))
    init_std: float = _opt("persona-init-std", 0.001, _non_negative)
    ifca_examples: int = _opt("ifca-examples", 8, _at_least(1))


@dataclass(frozen=True)
class RoutingConfig(_Section):
    """Which tiers serve a user, by the number of training records on the device."""

    cold_start_below: int = _opt("cold-start-below", 5, _at_least(0))  # fewer: the global tier
    frequent_from: int = _opt("frequent-from", 20, _at_least(0))  # at least: global + persona + user


@dataclass(frozen=True)
class FederationConfig(_Section):
    num_server_rounds: int = _opt("num-server-rounds", 3, _at_least(1))
    num_supernodes: int = _opt("num-supernodes", 20, _at_least(1))
    # share of clients per round; < 1 is Poisson client sampling
    fraction_train: float = _opt("fraction-train", 1.0, _fraction)
    round_timeout: float = _opt("round-timeout", 3600.0, _positive)
    # The server's step on the averaged update of the shared tiers (FedAvgM's server learning rate; 1 = plain
    # FedAvg). Post-processing of what is already private, so no epsilon changes: under DP the average's noise
    # falls as 1/sqrt(contributors), and a larger step moves the shared signal further at that lower noise.
    server_lr: float = _opt("server-lr", 1.0, _positive)


# The share of the record-level delta that the phrase release's threshold takes (client/context.py);
# the accountant is read at the rest.
CONTEXT_DELTA_SHARE = 0.1

# Each local optimizer's learning rate when ``lr = 0`` (TrainConfig.learning_rate).
LEARNING_RATES = {"adam": 0.02, "adambc": 0.02, "sgd": 0.5}


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Local training and record-level DP-SGD (Opacus) on the device."""

    local_steps: int = _opt("local-steps", 3, _at_least(1))
    # Records per DP-SGD step (the Poisson sampling rate is batch / records, at most 1);
    # 0 = every record in every step. At a record-level epsilon near 8 over a few steps,
    # amplification by subsampling buys little, so a whole local set (tens of records)
    # gets several times less noise on the averaged gradient than a batch of 6
    # (docs/results.md, issue 13).
    batch_size: int = _opt("batch-size", 0, _non_negative)
    # 0 = the optimizer's own: 0.02 for adam and adambc, 0.5 for sgd (under DP-SGD a step of lr x the noisy
    # clipped mean; 0.5 matches the norm of Adam's step at these sizes, docs/results.md issue 13)
    lr: float = _opt("lr", 0.0, _non_negative)
    # auto: sgd under DP, adam without. adam; sgd (momentum 0.9); adambc (Adam with DP bias correction,
    # Tang et al. 2024). Under DP, Adam divides every coordinate by its noise level, so coordinates with
    # no signal random-walk by about lr a step; SGD keeps the noise at its true per-coordinate scale
    # and measured better at epsilon 8 (docs/results.md, issue 13). Without DP, Adam measured best.
    optimizer: str = _opt("optimizer", "auto", _one_of("auto", "adam", "sgd", "adambc"))
    max_len: int = _opt("max-len", 56, _at_least(8))  # prompt + answer tokens
    dp: bool = _opt("dp", True)
    noise_multiplier: float = _opt("noise-multiplier", 1.0, _non_negative)  # 0 = clipping only
    max_grad_norm: float = _opt("max-grad-norm", 1.0, _positive)
    # Quantile-based adaptive clipping (Andrew et al. 2021, client/adaptive_clip.py): the clip norm follows
    # this quantile of the per-sample gradient norms (the share left unclipped), never above max-grad-norm;
    # 0 = a fixed clip norm. A noised count of the unclipped samples pays adaptive-clip-share of each step's
    # privacy, so the accounted epsilon is unchanged and the gradient noise grows by 1/sqrt(1 - share).
    adaptive_clip_quantile: float = _opt("adaptive-clip-quantile", 0.0, lambda v: None if 0 <= v < 1 else "must lie in [0, 1)")
    adaptive_clip_lr: float = _opt("adaptive-clip-lr", 0.2, _positive)  # the geometric step (Andrew et al.'s eta_C)
    adaptive_clip_share: float = _opt("adaptive-clip-share", 0.1, _open_unit)
    delta: float = _opt("delta", 1e-5, _open_unit)
    # record-level epsilon cap asked of every device (0 = none asked; the device's policy holds its own)
    max_epsilon: float = _opt("max-epsilon", 8.0, _non_negative)
    # record-level epsilon each device calibrates its noise to reach at the last planned round
    # (0 = use noise-multiplier as given); never above the cap
    target_epsilon: float = _opt("target-epsilon", 8.0, _non_negative)
    # Opacus' accountant for record-level epsilon: rdp, or prv (tighter, same mechanism)
    accountant: str = _opt("accountant", "prv", _one_of("rdp", "prv"))
    # which parts of the private tier train: its LoRA adapter and soft prompt, or the soft prompt only
    private_tier: str = _opt("private-tier", "lora+prompt", _one_of("lora+prompt", "prompt"))
    # Per-group clipping (McMahan et al. 2018): 0 = flat clipping of each record's whole gradient. s > 0 clips
    # the soft prompt's part to C*sqrt(s) and the LoRA adapters' part to C*sqrt(1 - s): a record's clipped
    # gradient still has norm <= C, so the noise and epsilon do not change, but the prompt, whose gradient
    # holds almost all of a record's norm, no longer takes the adapters' share of the clip budget.
    prompt_clip_share: float = _opt("prompt-clip-share", 0.0, lambda v: None if 0 <= v < 1 else "must lie in [0, 1)")
    # largest batch held in memory at once; a larger logical batch is split (Opacus' BatchMemoryManager)
    physical_batch: int = _opt("physical-batch", 16, _at_least(1))
    # In-context personalization (client/context.py): "phrases" puts how many of the device's records open
    # and close (their first and last words) in front of every prompt of its trained stacks. Under DP they
    # are released once with the weighted Gaussian mechanism for set union (Gopi et al. 2020), at
    # context-noise-multiplier or, on a device served a shared stack, at context-budget-share: one more
    # Gaussian step in the device's record-level accountant, calibrated with its DP-SGD steps to end at
    # target-epsilon, and CONTEXT_DELTA_SHARE of delta for the threshold. Without DP, the openings and
    # closings at least two records share. The default since issue 13's measurements (docs/results.md):
    # on the persona data it took the served NLL from 4.77-4.94 to 3.72-3.78 at the same epsilon (as
    # sentences; openings and closings since the twelfth session); on tweeteval it tied.
    context: str = _opt("context", "phrases", _one_of("none", "phrases"))
    context_noise: float = _opt("context-noise-multiplier", 1.0, _positive)
    # The share of its record-level budget (mu^2) the release takes on a device served a shared stack (fewer
    # than frequent-from training records) under shared-stack-dp-sgd = true (below; with false the release
    # takes all of it): its DP-SGD steps only feed the shared tiers, so its budget pays
    # most in the release (client.accounting.release_noise). On the persona data this is what lets a device
    # with 8-19 records release how they open and close (docs/results.md, issue 13, twelfth session).
    context_budget_share: float = _opt("context-budget-share", 0.9, _open_unit)
    # Whether a device served a shared stack (fewer than frequent-from training records) runs DP-SGD at all.
    # Its steps only feed the shared tiers, which average every device's update with equal weight, and with
    # a few records in its batch and most of its budget in the release its update is almost all noise. With
    # false (the default since the thirteenth session's measurement, docs/results.md issue 13) it runs none:
    # the release takes its whole budget (context-budget-share no longer applies) and it sends a zero
    # update, as a device not drawn does (client.accounting.runs_dp_sgd).
    shared_stack_dp_sgd: bool = _opt("shared-stack-dp-sgd", False)

    @property
    def local_optimizer(self) -> str:
        """The optimizer this run's devices use (``optimizer = auto`` resolved by ``dp``)."""
        if self.optimizer == "auto":
            return "sgd" if self.dp else "adam"
        return self.optimizer

    @property
    def learning_rate(self) -> float:
        """The local learning rate (``lr = 0``: the optimizer's own default)."""
        return self.lr or LEARNING_RATES[self.local_optimizer]

    @property
    def phrase_release(self) -> bool:
        """Whether devices release their shared phrases under DP (a Gaussian step and a threshold delta)."""
        return self.dp and self.context == "phrases"

    @property
    def accountant_delta(self) -> float:
        """The delta the record-level accountant is read at: ``delta``, less the phrase threshold's share."""
        return self.delta * (1 - CONTEXT_DELTA_SHARE) if self.phrase_release else self.delta

    @property
    def context_delta(self) -> float:
        """The delta the phrase release's threshold holds to (0 without it)."""
        return self.delta * CONTEXT_DELTA_SHARE if self.phrase_release else 0.0

    def batch_for(self, num_records: int) -> int:
        """The logical batch for a device holding ``num_records`` records (``batch-size = 0``: all of them)."""
        return max(1, num_records if self.batch_size == 0 else min(self.batch_size, num_records))


@dataclass(frozen=True)
class UserDPConfig(_Section):
    """User-level DP-FedAvg on everything shared."""

    enabled: bool = _opt("user-dp", False)
    noise_multiplier: float = _opt("user-noise-multiplier", 1.0, _positive)
    clip_norm: float = _opt("user-clip-norm", 1.0, _positive)
    delta: float = _opt("user-delta", 1e-5, _open_unit)  # must be well below 1/num-supernodes
    max_epsilon: float = _opt("user-max-epsilon", 0.0, _non_negative)  # 0 = no budget
    # Quantile-based adaptive clipping of user-clip-norm (Andrew et al. 2021, common/privacy/clip.py): the
    # server moves C each round toward this quantile of the update norms (the share left unclipped), from a
    # noised count that travels inside the same sum; never above user-clip-norm. 0 = a fixed C. The count
    # takes user-adaptive-clip-share of each release's privacy, so user-level epsilon is unchanged.
    adaptive_clip_quantile: float = _opt("user-adaptive-clip-quantile", 0.0, lambda v: None if 0 <= v < 1 else "must lie in [0, 1)")
    adaptive_clip_lr: float = _opt("user-adaptive-clip-lr", 0.2, _positive)  # the geometric step (eta_C)
    adaptive_clip_share: float = _opt("user-adaptive-clip-share", 0.1, _open_unit)
    # A pfl-style noise cohort (simulation only, NOT a guarantee for the run): the sum's noise is
    # scaled as if noise-cohort users of noise-population (0 = num-supernodes) were sampled per
    # round, and epsilon is that deployment's. 0 = off.
    noise_cohort: int = _opt("noise-cohort", 0, _at_least(0))
    noise_population: int = _opt("noise-population", 0, _at_least(0))

    @property
    def adaptive(self) -> bool:
        """Whether C adapts (user-level DP with a target quantile): the update then carries a clip bit."""
        return self.enabled and self.adaptive_clip_quantile > 0


@dataclass(frozen=True)
class SecAggConfig(_Section):
    """Secure aggregation (SecAgg+ stages over the Message API): the server sees sums only."""

    enabled: bool = _opt("secagg", True)
    clip_range: float = _opt("secagg-clip-range", 1.0, _positive)  # fixed-point range per coordinate
    modulus_bits: int = _opt("secagg-modulus-bits", 32, lambda v: None if 8 <= v <= 64 else "must lie in [8, 64]")
    # with user-dp: clients add noise shares before masking, or the server adds noise to the sum
    noise: str = _opt("secagg-noise", "distributed", _one_of("distributed", "server"))
    max_dropout: float = _opt("secagg-max-dropout", 0.3, lambda v: None if 0 <= v < 1 else "must lie in [0, 1)")
    # the share of clients that may collude with the server: the neighbour graph is sized for it
    # (Bell et al. 2020), and each distributed noise share is large enough that the honest rest
    # still add the full noise after colluders subtract theirs
    colluder_fraction: float = _opt("secagg-colluder-fraction", 0.1, lambda v: None if 0 <= v < 0.5 else "must lie in [0, 0.5)")


@dataclass(frozen=True)
class ScrubConfig(_Section):
    """PII scrubbing. A device reads only ``scrub-mode``, and only as a request its policy may refuse;
    operator and YAML are the device's own (the simulation harness writes them into its policy)."""

    mode: str = _opt("scrub-mode", "full", _one_of("full", "patterns", "off"))
    operator: str = _opt("scrub-operator", "tag", _one_of("tag", "mask", "pseudonym"))
    config: str = _opt("scrub-config", "")  # Presidio-format YAML; "" = the packaged default


@dataclass(frozen=True)
class DataConfig(_Section):
    """Simulation data (the harness's; a deployed device names its own file in its policy)."""

    data_dir: str = _opt("data-dir", "data/default")
    num_personas: int = _opt("num-personas", 4, _at_least(1))
    holdout_users: int = _opt("holdout-users", 4, _at_least(0))  # generated but never federated
    # one-run audit canaries per canary user, each in its train data with probability 1/2
    audit_canaries: int = _opt("audit-canaries", 50, _at_least(0))


@dataclass(frozen=True)
class OutputConfig(_Section):
    seed: int = _opt("seed", 0, _at_least(0))
    run_dir: str = _opt("run-dir", "runs/latest")  # the server's output folder


_SECTIONS = {
    "model": ModelConfig,
    "persona": PersonaConfig,
    "routing": RoutingConfig,
    "federation": FederationConfig,
    "train": TrainConfig,
    "user_dp": UserDPConfig,
    "secagg": SecAggConfig,
    "scrub": ScrubConfig,
    "data": DataConfig,
    "output": OutputConfig,
}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    persona: PersonaConfig = field(default_factory=PersonaConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    user_dp: UserDPConfig = field(default_factory=UserDPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    scrub: ScrubConfig = field(default_factory=ScrubConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        p, fed = self.persona, self.federation
        if p.slots > fed.num_supernodes:
            raise ConfigError("persona-slots", "must not exceed num-supernodes")
        if self.routing.frequent_from < self.routing.cold_start_below:
            raise ConfigError("frequent-from", "must be >= cold-start-below")
        if self.secagg.enabled and fed.num_supernodes < 3:
            raise ConfigError("num-supernodes", "secure aggregation needs at least 3 clients")
        if self.user_dp.enabled and self.user_dp.delta >= 0.1 / self.user_population:
            raise ConfigError("user-delta", "must be well below 1/population (num-supernodes, or noise-population under a noise cohort): at most a tenth of it")
        ud = self.user_dp
        if ud.noise_cohort:
            if not ud.enabled:
                raise ConfigError("noise-cohort", "needs user-dp")
            if self.noise_placement != "server":
                # Devices never lower their own noise shares: the simulated cohort's scaling is the server's.
                raise ConfigError("noise-cohort", "scales server-added noise only; use secagg=false or secagg-noise=server")
            if ud.noise_cohort > self.user_population:
                raise ConfigError("noise-cohort", "must not exceed noise-population")
        elif ud.noise_population:
            raise ConfigError("noise-population", "only with noise-cohort")
        if ud.adaptive_clip_quantile and not ud.enabled:
            raise ConfigError("user-adaptive-clip-quantile", "needs user-dp")
        if self.train.prompt_clip_share and self.train.adaptive_clip_quantile:
            # The quantile of one flat norm has no meaning for two groups' separate clip norms.
            raise ConfigError("prompt-clip-share", "cannot be combined with adaptive-clip-quantile")
        if p.slots and p.assign != "random" and not (self.user_dp.enabled and self.noise_placement == "distributed"):
            # A choice derived from the device's data, and the profile row k-means sends,
            # must leave the device only inside an accounted DP mechanism the server
            # cannot see around: user-level DP with device-added noise under secure aggregation.
            raise ConfigError("persona-assign", "kmeans and ifca need user-dp with secagg and secagg-noise=distributed; use random")

    @property
    def seed(self) -> int:
        return self.output.seed

    @property
    def client_sample_rate(self) -> float:
        """The Poisson client-sampling rate: ``round(f*N)/N``, or 1 when every client takes part."""
        fed = self.federation
        if fed.fraction_train >= 1.0:
            return 1.0
        return max(1, round(fed.fraction_train * fed.num_supernodes)) / fed.num_supernodes

    @property
    def user_population(self) -> int:
        """The population user-level DP is accounted over: ``noise-population`` under a noise cohort, else the run's."""
        if self.user_dp.noise_cohort and self.user_dp.noise_population:
            return self.user_dp.noise_population
        return self.federation.num_supernodes

    @property
    def noise_scale(self) -> float:
        """The factor on the sum's user-level noise: expected cohort / noise cohort under a noise cohort, else 1.

        The average over the simulated cohort then carries the noise the
        average over the noise cohort would (pfl-research's noise cohort).
        """
        if not self.user_dp.noise_cohort:
            return 1.0
        return self.client_sample_rate * self.federation.num_supernodes / self.user_dp.noise_cohort

    @property
    def user_sample_rate(self) -> float:
        """The client-sampling rate user-level DP is accounted with: noise cohort / population, else the run's."""
        return self.user_dp.noise_cohort / self.user_population if self.user_dp.noise_cohort else self.client_sample_rate

    @property
    def noise_placement(self) -> str:
        """Where user-level noise is added: on the devices (distributed, needs secagg) or on the server."""
        return "distributed" if self.secagg.enabled and self.secagg.noise == "distributed" else "server"

    @classmethod
    def keys(cls) -> list[str]:
        return [k for section in _SECTIONS.values() for k in section.keys()]

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> "RunConfig":
        """Validate a flat ``kebab-case`` mapping (Flower's run config); missing keys take their defaults."""
        unknown = sorted(set(flat) - set(cls.keys()))
        if unknown:
            raise ConfigError(unknown[0], "unknown configuration key" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        return cls(**{name: section._from_flat(flat) for name, section in _SECTIONS.items()})

    def flat(self) -> dict[str, Any]:
        """The flat ``kebab-case`` form: what Flower's run config and ``config.json`` hold."""
        out: dict[str, Any] = {}
        for name in _SECTIONS:
            out.update(getattr(self, name)._flat())
        return out

    def with_values(self, **flat: Any) -> "RunConfig":
        """A validated copy with some flat keys changed (``with_values(**{"persona-slots": 0})``)."""
        return RunConfig.from_flat({**self.flat(), **flat})


DEFAULTS: dict[str, Any] = RunConfig().flat()

# Size/time trade-off knob. "default" is sized for `make demo` (<= 10 min on two
# cores, install included); "quick" is for smoke tests; "full" for experiments.
PROFILES: dict[str, dict[str, Any]] = {
    # quick keeps DP-SGD on every device (its users are small), so its smoke runs exercise DP-SGD everywhere;
    # the devices that run none have their own tests (tests/test_context.py)
    "quick": {"model": "tiny-random", "num-supernodes": 6, "num-personas": 3, "persona-slots": 3, "persona-min-size": 1, "num-server-rounds": 2, "local-steps": 2,
              "shared-stack-dp-sgd": True},
    "default": {},
    "full": {"num-supernodes": 32, "num-server-rounds": 5, "local-steps": 4},
}


def build_config(profile: str = "default", overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """A profile's settings with ``overrides`` on top, validated."""
    if profile not in PROFILES:
        raise ConfigError("profile", "must be one of " + ", ".join(PROFILES))
    return RunConfig.from_flat({**PROFILES[profile], **(overrides or {})})
