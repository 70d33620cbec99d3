"""The search spec: one YAML file that says what to compress, on which data, how to search and measure.

Loaded with ``yaml.safe_load``, validated in full (pydantic) before any work starts. Every error names the
key path, the value received and the fix. ``--set key.path=value`` overrides keys (values are parsed as
YAML scalars); ``trials``, ``seed`` and ``sampler`` are shortcuts for ``search.*``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SpecError, close_matches

DEFAULT_MODEL = "default"  # the packaged sentence-transformers/all-MiniLM-L6-v2
SHORTCUTS = {"trials": "search.trials", "seed": "search.seed", "sampler": "search.sampler", "study": "study"}
BASE_OBJECTIVES = {
    "accuracy": "maximize",
    "f1": "maximize",
    "mcc": "maximize",
    "size_mb": "minimize",
    "params": "minimize",
    "flops": "minimize",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    name: str = Field(DEFAULT_MODEL, description="'default' (packaged all-MiniLM-L6-v2), a local HF model directory or a hub id")
    max_length: int = Field(128, ge=8, le=4096, description="tokenizer truncation length")
    trust_remote_code: bool = Field(False, description="allow custom model code from the hub (never implied)")


class DataSpec(_Strict):
    path: str | None = Field(None, description="local directory or file with the task data (relative to the working directory)")
    hub_id: str | None = Field(None, description="a datasets hub id (e.g. 'nyu-mll/glue'), for online use")
    hub_config: str | None = Field(None, description="hub dataset config (e.g. 'sst2')")
    format: Literal["auto", "tsv", "csv", "json", "jsonl"] = "auto"
    train_split: str = "train"
    eval_split: str = Field("dev", description="held-out split the report evaluates on ('dev' file, or 'validation' on the hub)")
    text_columns: list[str] | None = Field(None, description="one or two text columns; detected from GLUE layouts if unset")
    label_column: str | None = Field(None, description="label column; detected ('label') if unset")
    labels: list[Union[int, str]] | None = Field(None, description="the label set, in class-index order; inferred if unset")
    validation_size: float = Field(2000, gt=0, description="examples carved (seeded) from train to select on; a fraction if < 1 (of the sentences with validation_carve: sentences)")
    validation_carve: Literal["random", "sentences"] = Field(
        "random", description="'random' rows, or 'sentences': whole sentences of a phrase-level train split (SST), "
        "with the phrases found only inside them taken out of train, so validation looks like a held-out split")
    max_train_examples: int | None = Field(None, ge=1, description="cap on training examples after carving validation")
    max_eval_examples: int | None = Field(None, ge=1, description="cap on held-out evaluation examples")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSpec":
        if self.path is None and self.hub_id is None:
            raise ValueError("set data.path (a local directory or file) or data.hub_id (a datasets hub id); use --data PATH on the command line")
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"data.text_columns takes one or two column names, got {self.text_columns!r}")
        return self


# Shared by the baseline's and the recovery's option of the same name.
_MICRO_BATCHES = (
    "split each batch into N length-sorted micro-batches, each padded to its own longest example, and add up their "
    "gradients before the one optimiser step: the same batches and updates as 1 (unlike group_by_length), with "
    "fewer padded tokens; on SST-2's short phrases 4 cut a MiniLM step from 1.0-1.1 s to 0.61-0.65 s on a 2-core "
    "CPU (scripts/step_time.py). Weighs hidden-state distillation losses per example rather than per token")


class TrainSpec(_Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    select_checkpoints: int = Field(0, ge=0, description=(
        "0 keeps the model training ends with; N > 0 scores N checkpoints, evenly spaced through training (the "
        "last included), on the validation split and keeps the most accurate"))
    average_checkpoints: int = Field(0, ge=0, description=(
        "0 or K >= 2 (at most select_checkpoints): keep the mean of the last K scored checkpoints' weights "
        "(checkpoint averaging) instead of the best single checkpoint; its validation score is recorded"))
    group_by_length: bool = Field(False, description=(
        "draw batches of similar length (fewer padded tokens: faster steps on short texts)"))
    micro_batches: int = Field(1, ge=1, description=_MICRO_BATCHES)
    seed: int | None = Field(None, description=(
        "seed of the fine-tune (the new head's initialisation and the batch order); default: the spec's seed, "
        "which also carves validation and stays the carve's seed whatever this says"))
    soup: list[dict[str, Any]] = Field(default_factory=list, description=(
        "more fine-tunes to average with this one (a greedy model soup, Wortsman et al. 2022): each entry names "
        "the baseline options it changes, e.g. {seed: 1} or {learning_rate: 3.0e-5}; each is fine-tuned and "
        "cached as a baseline of its own, and an ingredient joins the weight mean only if validation accuracy "
        "does not drop"))

    @model_validator(mode="after")
    def _averaging(self) -> "TrainSpec":
        k = self.average_checkpoints
        if k and not 2 <= k <= self.select_checkpoints:
            raise ValueError(f"average_checkpoints={k} averages 2 to select_checkpoints "
                             f"({self.select_checkpoints}) checkpoints; raise select_checkpoints or set it to 0")
        for i in range(len(self.soup)):
            self.ingredient(i)  # each entry must make a valid recipe: checked when the spec loads
        return self

    def ingredient(self, i: int) -> "TrainSpec":
        """The recipe of soup entry ``i``: this one with the entry's changes (and no soup of its own)."""
        changes = self.soup[i]
        allowed = sorted(set(type(self).model_fields) - {"soup"})
        unknown = sorted(set(changes) - set(allowed))
        if not changes or unknown:
            raise ValueError(f"soup[{i}] = {changes!r}: each soup entry is a mapping of the baseline options its "
                             f"fine-tune changes ({', '.join(allowed)}), e.g. {{seed: 1}}"
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        try:
            recipe = TrainSpec(**{**self.model_dump(exclude={"soup"}), **changes})
        except ValidationError as exc:
            raise ValueError(f"soup[{i}] = {changes!r} makes an invalid recipe: "
                             f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
        if recipe == self.model_copy(update={"soup": []}):  # the same fine-tune twice would only weigh it double
            raise ValueError(f"soup[{i}] = {changes!r} changes nothing in the recipe; give it another seed, "
                             "learning rate or other option, or remove it")
        return recipe


class RecoverySpec(_Strict):
    steps: int = Field(100, ge=0, description="recovery fine-tuning steps per trial (0 = none)")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-5, gt=0, lt=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    group_by_length: bool = Field(False, description=(
        "draw batches of similar length (fewer padded tokens: faster steps on short texts)"))
    micro_batches: int = Field(1, ge=1, description=_MICRO_BATCHES)


# Options added after studies and baselines were cached: left out of study fingerprints and baseline cache
# keys while at their defaults, so what was cached before they existed stays valid.
ADDED_LATER: dict[tuple[str, str], Any] = {
    ("baseline", "average_checkpoints"): 0,
    ("baseline", "group_by_length"): False,
    ("baseline", "seed"): None,
    ("baseline", "soup"): [],
    ("recovery", "group_by_length"): False,
    ("baseline", "micro_batches"): 1,
    ("recovery", "micro_batches"): 1,
}


def without_later_defaults(dumped: dict[str, Any]) -> dict[str, Any]:
    """``dumped`` (a ``model_dump``, changed in place) without the :data:`ADDED_LATER` keys at their defaults."""
    for (section, key), default in ADDED_LATER.items():
        part = dumped.get(section)
        if isinstance(part, dict) and key in part and part[key] == default:
            del part[key]
    return dumped


class MeasurementSpec(_Strict):
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    batch_sizes: list[int] = Field([32, 1], min_length=1)
    latency_examples: int = Field(256, ge=1, description="evaluation sentences timed per batch size (fixed sample)")
    max_batches: int = Field(32, ge=1, description="at most this many batches timed per batch size (keeps batch 1 cheap)")
    warmup: int = Field(1, ge=0, description="untimed passes before timing")
    repeats: int = Field(5, ge=1, description="timed passes; the median is reported")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads while timing (default: all cores)")
    flops_seq_len: int | None = Field(None, ge=1, description="sequence length for FLOPs (default: mean evaluation length)")
    runtime: Literal["pytorch", "onnxruntime"] = Field(
        "pytorch", description="where latency and accuracy are measured: 'pytorch' (eager) or 'onnxruntime' (each "
        "model exported to ONNX and run by ONNX Runtime on CPU, int8 with its own kernels; needs the onnx extra)")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"unknown device {v!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _bs(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"batch sizes must be >= 1, got {v}")
        return list(dict.fromkeys(v))


class ObjectiveSpec(_Strict):
    name: str
    direction: Literal["maximize", "minimize"] | None = None


class TechniqueSpec(_Strict):
    enabled: Union[bool, Literal["search"]] = "search"
    params: dict[str, Any] = Field(default_factory=dict)


class RaySpec(_Strict):
    """Ray Tune backend (``search.backend: ray``; needs ``pip install 'autocompress[ray]'``)."""

    address: str | None = Field(None, description="Ray cluster to join ('auto', or 'HOST:PORT'); unset = start Ray on this machine")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs reserved for each trial (fractions allowed)")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs reserved for each trial (fractions share one GPU); > 0 runs trials on CUDA")
    max_concurrent: int | None = Field(None, ge=1, description="at most this many trials at once (default: as many as the resources allow)")

    @field_validator("gpus_per_trial")
    @classmethod
    def _gpus(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"a trial takes a fraction of one GPU or whole GPUs, got {v}; use e.g. 0.5, 1 or 2")
        return v


class FidelitySpec(_Strict):
    """Multi-fidelity schedule: screen every candidate with a short recovery fine-tune, then retrain the most
    promising at the full ``recovery.steps`` (Optuna has no pruning for multi-objective studies)."""

    screen_steps: int = Field(..., ge=0, description="recovery steps of a screening trial (0: no recovery training); "
                              "recovery.steps stays the full budget of a promoted trial")
    promote: int = Field(..., ge=1, description="screened trials retrained at the full budget once search.trials "
                         "are screened: the best non-dominated ranks first, then the least crowded")


class SearchSpec(_Strict):
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    seed: int = 0
    trials: int = Field(20, ge=1)
    population_size: int | None = Field(None, ge=2, description="NSGA-II population (default: min(20, trials))")
    storage: str | None = Field(None, description="Optuna storage URL; default: SQLite in the study folder")
    keep_models: Literal["front", "all", "none"] = Field("front", description="which trial models stay on disk")
    enqueue: list[dict[str, Optional[dict[str, Any]]]] = Field(
        default_factory=list,
        description="pipelines ({technique: {param: value}}) run first, exactly as given, before the sampler "
        "proposes any; unset parameters take the spec's fixed value or the technique's default; unlisted "
        "techniques are off")
    backend: Literal["optuna", "ray"] = Field("optuna", description="optuna: worker processes sharing the study "
                                              "storage; ray: Ray Tune trials (search.ray)")
    workers: int = Field(1, ge=1, description="worker processes on this machine, one trial each, sharing the study "
                         "(with several GPUs: one per GPU)")
    max_failures: int = Field(2, ge=0, description="times a trial whose worker died (killed, out of host memory, node "
                              "lost) is started again; an exception inside a trial is recorded as its failure at once")
    heartbeat_interval: int = Field(10, ge=1, description="seconds between a running trial's heartbeats in the storage")
    heartbeat_grace: int = Field(60, ge=2, description="a running trial without a heartbeat for this long is stale: "
                                 "its worker died, and it is retried")
    ray: RaySpec = Field(default_factory=RaySpec)
    fidelity: FidelitySpec | None = Field(None, description="screen search.trials candidates cheaply, then retrain "
                                          "fidelity.promote of them at the full recovery budget")

    @property
    def total_trials(self) -> int:
        """Finished trials the study runs to: the screened candidates plus the promoted retrainings."""
        return self.trials + (self.fidelity.promote if self.fidelity else 0)

    @model_validator(mode="after")
    def _heartbeat(self) -> "SearchSpec":
        if self.heartbeat_grace <= self.heartbeat_interval:
            raise ValueError(f"search.heartbeat_grace ({self.heartbeat_grace}) must be longer than "
                             f"search.heartbeat_interval ({self.heartbeat_interval}), e.g. 6 times it")
        return self


class ConstraintSpec(_Strict):
    max_accuracy_drop: float | None = Field(None, ge=0, description="points of accuracy below the baseline")
    max_latency_ms: float | None = Field(None, gt=0, description="ms per example at the first measured batch size")
    max_size_mb: float | None = Field(None, gt=0)


class Spec(_Strict):
    study: str = Field(..., min_length=1)
    description: str = ""
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec
    baseline: TrainSpec = Field(default_factory=TrainSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    measurement: MeasurementSpec = Field(default_factory=MeasurementSpec)
    objectives: list[Union[str, ObjectiveSpec]] = Field(
        default_factory=lambda: ["accuracy", "latency_bs32", "size_mb"], min_length=1
    )
    techniques: dict[str, TechniqueSpec] = Field(..., min_length=1)
    search: SearchSpec = Field(default_factory=SearchSpec)
    constraints: ConstraintSpec = Field(default_factory=ConstraintSpec)
    seed: int = Field(0, description="seed for data carving and training")

    @model_validator(mode="after")
    def _fidelity(self) -> "Spec":
        f = self.search.fidelity
        if f is None:
            return self
        if f.screen_steps >= self.recovery.steps:
            raise ValueError(f"search.fidelity.screen_steps ({f.screen_steps}) must be below recovery.steps "
                             f"({self.recovery.steps}), the full budget promoted trials get; lower screen_steps or "
                             "raise recovery.steps")
        if f.promote > self.search.trials:
            raise ValueError(f"search.fidelity.promote ({f.promote}) cannot exceed search.trials ({self.search.trials}), "
                             "the screened candidates it promotes from; lower promote or raise trials")
        if self.search.workers > 1 or self.search.backend == "ray":
            raise ValueError("search.fidelity runs in one process for now (the promotion step waits for every "
                             "screened trial); set search.workers: 1 and search.backend: optuna, or remove search.fidelity")
        return self

    @field_validator("study")
    @classmethod
    def _study_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) or ".." in v:
            raise ValueError(
                f"study name {v!r} must be letters, digits, '.', '_' or '-' (no path separators, no '..'), "
                "because it names a folder under the results directory"
            )
        return v

    def objective_list(self) -> list[tuple[str, str]]:
        """``(name, direction)`` for each objective, validated against what can be measured."""
        known = dict(BASE_OBJECTIVES)
        for bs in self.measurement.batch_sizes:
            known[f"latency_bs{bs}"] = "minimize"
        out: list[tuple[str, str]] = []
        for i, obj in enumerate(self.objectives):
            name, direction = (obj, None) if isinstance(obj, str) else (obj.name, obj.direction)
            if name not in known:
                hint = close_matches(name, list(known))
                raise SpecError(
                    f"objectives[{i}]: unknown objective {name!r}.{hint} Known: {', '.join(sorted(known))} "
                    "(latency_bsN needs N in measurement.batch_sizes)."
                )
            if direction is not None and direction != known[name]:
                raise SpecError(f"objectives[{i}]: {name!r} can only be {known[name]}d, got direction {direction!r}")
            if name in [n for n, _ in out]:
                raise SpecError(f"objectives[{i}]: {name!r} is listed twice; remove the duplicate")
            out.append((name, known[name]))
        return out


# ----------------------------------------------------------------------------------------------------------


def _format_validation_error(err: ValidationError, data: Mapping[str, Any]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith(("function-", "union[", "literal[")))
        kind = e["type"]
        if kind == "extra_forbidden":
            parent, key = (loc.rsplit(".", 1) + [""])[:2] if "." in loc else ("", loc)
            lines.append(f"- {loc}: unknown key.{_hint_key(key, parent)} Remove it or fix its spelling.")
        elif kind == "missing":
            lines.append(f"- {loc}: required key is missing; add it to the spec.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            shown = "" if isinstance(value, (dict, list)) and len(str(value)) > 80 else f" (got {value!r})"
            lines.append(f"- {loc or '(top level)'}: {msg}{shown}")
    return "invalid search spec:\n" + "\n".join(dict.fromkeys(lines))


def _hint_key(key: str, parent: str) -> str:
    model: Any = Spec
    for part in [p for p in parent.split(".") if p]:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    return close_matches(key, list(model.model_fields))


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trials=40 or --set recovery.steps=50")
        key, raw = item.split("=", 1)
        key = SHORTCUTS.get(key.strip(), key.strip())
        if not key or any(not p for p in key.split(".")):
            raise SpecError(f"--set {item!r}: empty key path; write it like search.trials=40")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.split("."), value))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for path, value in parse_overrides(overrides):
        node = data
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise SpecError(f"--set {'.'.join(path)}: {part!r} is not a mapping in the spec")
            node = nxt
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"search spec {str(p)!r} not found; pass the path to a YAML file (see search_spaces/)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"search spec {str(p)!r} is not valid YAML{where}: {problem}. Fix the syntax there.") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"search spec {str(p)!r} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    if data is None:
        raise SpecError(f"search spec {str(p)!r} is empty; start from one in search_spaces/")
    if not isinstance(data, dict):
        raise SpecError(f"search spec {str(p)!r} must be a YAML mapping at the top level, got {type(data).__name__}")
    return data


def load_spec(path: str | Path | None = None, *, data: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> Spec:
    """Read, override and validate a spec (structure only: technique names and parameters are checked against
    the registry by :func:`autocompress.space.resolve_space`)."""
    raw = read_yaml(path) if data is None else json.loads(json.dumps(data))
    raw = apply_overrides(raw, overrides)
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc, raw)) from None
    spec.objective_list()
    return spec


def dump_spec(spec: Spec) -> str:
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
