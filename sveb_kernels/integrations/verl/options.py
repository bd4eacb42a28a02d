"""`algorithm.sveb`: the plugin's options, read from the config verl passes (driver side) or from the
plain dict the driver sends the actor workers (`hista_request`). Imports nothing from verl."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Mapping, Optional

from ...estimators import ADVANTAGE_MODES

ESTIMATORS = ("sveb_gae", "sveb_numca", "sveb_hista")
CONFIG_KEY = "sveb"


@dataclass(frozen=True)
class NumcaOptions:
    match: str = "last"
    leave_one_out: bool = True
    min_support: int = 1


@dataclass(frozen=True)
class HistaOptions:
    # Index into the model's `output_hidden_states` tuple: 0 = embeddings, i = after decoder layer i,
    # -1 = the last entry (after the final norm).
    layer: int = -1
    temperature: float = 0.1
    similarity: str = "cosine"


@dataclass(frozen=True)
class Options:
    """Everything under `algorithm.sveb` in verl's config."""

    backend: str = "auto"
    # Numca / Hista: advantages R - V(s_t) ("r_minus_v") or GAE over V ("gae", with algorithm.gamma/lam).
    mode: str = "r_minus_v"
    # Numca / Hista: whiten the advantages over the response tokens of the rollouts with signal
    # instead of verl's GRPO division by the group std (`algorithm.norm_adv_by_std_in_grpo`).
    # sveb_gae always whitens, as verl's GAE does.
    whiten: bool = False
    # Numca: tokenizer name or path for the numeric vocabulary. Unset: the actor's tokenizer (verl's
    # v1 trainer), else the one given to `set_tokenizer`.
    tokenizer: Optional[str] = None
    numca: NumcaOptions = field(default_factory=NumcaOptions)
    hista: HistaOptions = field(default_factory=HistaOptions)

    @classmethod
    def from_config(cls, config) -> "Options":
        """Reads `config.sveb` (a DictConfig, dict, verl AlgoConfig or None); unknown keys are an error."""
        raw = get(config, CONFIG_KEY) if config is not None else None
        if raw is None:
            return cls()
        raw = plain(raw)
        if not isinstance(raw, dict):
            raise TypeError(f"algorithm.{CONFIG_KEY} must be a mapping, got {type(raw).__name__}")
        options = dataclass_from(cls, raw, f"algorithm.{CONFIG_KEY}")
        if options.mode not in ADVANTAGE_MODES:
            raise ValueError(f"algorithm.{CONFIG_KEY}.mode must be one of {ADVANTAGE_MODES}, got {options.mode!r}")
        return options


def get(config, key, default=None):
    if isinstance(config, Mapping) or hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def plain(x):
    """DictConfig / ListConfig / Mapping -> plain dicts and lists (resolving interpolations)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(x, (DictConfig, ListConfig)):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:  # omegaconf comes with verl; plain dicts work without it
        pass
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    return x


def dataclass_from(cls, raw: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(where + '.' + k for k in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        sub = known[name].default_factory if known[name].default_factory is not MISSING else None
        if sub is not None:
            if not isinstance(value, dict):
                raise TypeError(f"{where}.{name} must be a mapping, got {type(value).__name__}")
            kwargs[name] = dataclass_from(sub, value, f"{where}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)



def estimator_name(adv_estimator) -> str:
    """verl passes the estimator as a string or as its `AdvantageEstimator` enum."""
    return getattr(adv_estimator, "value", adv_estimator)


def hista_request(options: Options) -> dict:
    """What the driver puts into the log-prob batch: plain values, picklable and rank-independent."""
    return {"layer": options.hista.layer, "temperature": options.hista.temperature,
            "similarity": options.hista.similarity, "backend": options.backend}


def options_from_request(request) -> Options:
    request = dict(plain(getattr(request, "data", request)))
    backend = request.pop("backend", "auto")
    return Options(backend=backend, hista=dataclass_from(HistaOptions, request, f"algorithm.{CONFIG_KEY}.hista"))
