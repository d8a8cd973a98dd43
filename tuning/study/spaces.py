"""Search spaces as data: ``search_spaces/<name>.yaml`` becomes a validated
:class:`SearchSpace`, an Optuna define-by-run function for Ray Tune's
``OptunaSearch``, and, per trial, the typed configs the model is built from.

    space = load_space("resnet")                  # a registered name, or a path to a .yaml
    searcher = OptunaSearch(space=to_optuna(space), metric="val_loss", mode="min")
    configs = build_configs(space, config)        # in the trainable: Tune's flat dict

The format is described in ``search_spaces/README.md``. A space lists only what
it searches (and optional ``fixed`` overrides); every other setting keeps the
default of its dataclass (:class:`heimdall.losses.LossConfig`,
:class:`heimdall.module.OptimizerConfig`, the architecture's model config).
Every problem of a space is reported at once by :func:`validate_space`,
including configurations that the dataclasses reject at the corners of the
space, so a bad space fails before a study starts, not after 50 trials.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import yaml

from heimdall.devices import TrainerConfig
from heimdall.errors import ConfigError, collect_problems
from heimdall.losses import LossConfig, validate_model_and_loss
from heimdall.models import ARCHITECTURES
from heimdall.optimizer import OptimizerConfig

if TYPE_CHECKING:
    import optuna

__all__ = [
    "SPACES_DIR",
    "KINDS",
    "SECTIONS",
    "Condition",
    "Parameter",
    "SearchSpace",
    "TrialConfigs",
    "section_class",
    "available_spaces",
    "load_space",
    "validate_space",
    "with_overrides",
    "to_optuna",
    "build_configs",
    "WARMUPS",
    "check_space_budget",
    "check_space_devices",
    "budget_overrides",
    "fit_budget",
    "space_summary",
]

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
KINDS = ("choice", "uniform", "loguniform", "int")
SECTIONS = ("model", "loss", "optimizer", "trainer")
_TOP_KEYS = ("arch", "fixed", "parameters")
_OPTIONS = {"choice": (), "uniform": ("step",), "loguniform": (), "int": ("step", "log")}
_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Condition:
    """``when: {parameter: value}`` or ``when: {parameter: {in: [v, ...]}}``."""

    parameter: str
    values: tuple[Any, ...]

    def holds(self, assigned: Mapping[str, Any]) -> bool:
        """True when ``parameter`` is assigned and equals one of ``values``."""
        return self.parameter in assigned and any(_same(assigned[self.parameter], v) for v in self.values)


@dataclass(frozen=True)
class Parameter:
    """One searched setting, ``section.field``, and its distribution.

    ``choices`` is set for kind ``choice``; ``low``/``high`` (inclusive) for
    the other kinds, with optional ``step`` (uniform, int) and ``log`` (int).
    The parameter is suggested only when every condition in ``when`` holds.
    """

    name: str
    kind: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    when: tuple[Condition, ...] = ()

    @property
    def section(self) -> str:
        """``model``, ``loss``, ``optimizer`` or ``trainer``."""
        return self.name.split(".", 1)[0]

    @property
    def field(self) -> str:
        """The dataclass field the value goes to."""
        return self.name.split(".", 1)[1]

    def corners(self) -> tuple[Any, ...]:
        """Values the semantic check tries: every choice, or both bounds."""
        return self.choices if self.kind == "choice" else (self.low, self.high)

    def contains(self, value: Any) -> bool:
        """True when ``value`` is one this parameter can take."""
        if self.kind == "choice":
            return any(_same(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high and (self.kind != "int" or isinstance(value, int))


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space.

    Attributes:
        name: the file's stem (``"inline"`` for a space not read from a file).
        arch: the architecture, a key of :data:`heimdall.models.ARCHITECTURES`.
        parameters: in suggestion order: a parameter comes after those its
            ``when`` refers to, ties broken by name, so the order (and hence
            what a seeded sampler draws) depends only on the content.
        fixed: every fixed value, the file's and the overrides.
        overrides: the values :func:`with_overrides` added (e.g. the command
            line's ``optimizer.max_epochs``).
        source: the YAML file, or None.
        sha256: hash of the effective content (arch, fixed, parameters, keys
            sorted), not of comments or layout.
        content: the file's parsed content, kept to re-validate with overrides.
    """

    name: str
    arch: str
    parameters: tuple[Parameter, ...]
    fixed: Mapping[str, Any]
    overrides: Mapping[str, Any]
    source: Path | None
    sha256: str
    content: Mapping[str, Any] = field(repr=False, compare=False)

    def parameter(self, name: str) -> Parameter:
        """The parameter called ``name`` (KeyError if not searched)."""
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)


@dataclass(frozen=True)
class TrialConfigs:
    """The typed configs of one trial, ready for ``build_model``, the module and the Trainer.

    ``trainer.precision`` is None unless the space searches or fixes it: the study's
    ``--precision`` applies then.
    """

    arch: str
    model: Any
    loss: LossConfig
    optimizer: Any
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def as_flat_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as ``{"section.field": value}`` (for logging)."""
        out: dict[str, Any] = {"arch": self.arch}
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out


def section_class(section: str, arch: str) -> type | None:
    """The config dataclass a section resolves to (None for ``model`` of an unknown arch).

    Args:
        section: ``"model"``, ``"loss"``, ``"optimizer"`` or ``"trainer"``.
        arch: an architecture name of :data:`heimdall.models.ARCHITECTURES`.
    """
    if section == "model":
        entry = ARCHITECTURES.get(arch)
        return entry[0] if entry else None
    return {"loss": LossConfig, "optimizer": OptimizerConfig, "trainer": TrainerConfig}[section]


# --------------------------------------------------------------------------- registry


def available_spaces() -> list[str]:
    """Names of the shipped spaces (``search_spaces/<name>.yaml``), sorted."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load and validate a registered space by name, or a YAML file by path.

    Args:
        name_or_path: ``"resnet"`` looks up ``search_spaces/resnet.yaml``; anything
            with a path separator or a ``.yaml``/``.yml`` suffix is read as a path.

    Returns:
        The validated space, named after the file's stem.

    Raises:
        ConfigError: unknown name (listing the valid ones), unreadable file,
            invalid YAML, or every problem :func:`validate_space` finds.
    """
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
    else:
        path = SPACES_DIR / f"{text}.yaml"
        if not path.is_file():
            valid = ", ".join(available_spaces()) or "(none)"
            raise ConfigError("search space name", [
                f"unknown search space {text!r}; valid names: {valid} (or give a path to a .yaml file)"])
    return validate_space(_read_yaml(path), path)


def _read_yaml(path: Path) -> Any:
    what = f"search space {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(what, [f"cannot read the file: {e.strerror or e}; check the path"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError(what, [f"not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                                 f"fix: save the file as UTF-8 YAML"]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError(what, [f"not valid YAML: {e}"]) from e


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a repeated key (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}: each key may appear once", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# --------------------------------------------------------------------------- validation


def validate_space(raw: Any, source: str | Path | None = None) -> SearchSpace:
    """Check a space as loaded from YAML and report every problem at once.

    Structural checks: top-level keys, arch, sections, fields, kinds and their
    options, bounds, choices, value types against the dataclass fields, ``when``
    references and their order (no cycles), fixed-and-searched overlaps. When
    those pass, the configs are built through the real dataclasses and the
    model/loss pair check at the corners of the space: every parameter in turn
    at each choice or bound, the others at their first choice or low bound.

    Args:
        raw: the parsed YAML.
        source: where it came from (a path names the space; else ``"inline"``).

    Returns:
        The validated :class:`SearchSpace`.

    Raises:
        ConfigError: listing every problem found.
    """
    return _validate(raw, Path(source) if source is not None else None, {})


def with_overrides(space: SearchSpace, fixed: Mapping[str, Any]) -> SearchSpace:
    """The space with more fixed values, re-validated at its corners.

    For settings a command decides (``optimizer.max_epochs``; a smaller
    ``optimizer.batch_size`` in a test). A clash with the space, such as a
    searched ``loss.mse_warmup_epochs`` reaching the new ``max_epochs``, is
    reported now, before a study starts. An override may replace one of the
    file's fixed values and may equal a default; one naming a searched
    parameter pins it (it leaves the search), unless a ``when`` refers to it.

    Args:
        space: a validated space.
        fixed: ``{"section.field": value}``.

    Returns:
        A new space; ``sha256`` changes with the effective content.

    Raises:
        ConfigError: listing every problem.
    """
    return _validate(space.content, space.source, {**space.overrides, **fixed})


def _validate(raw: Any, path: Path | None, overrides: Mapping[str, Any]) -> SearchSpace:
    raw = copy.deepcopy(raw)  # the space keeps it; later edits by the caller must not leak in
    what = f"search space {str(path) if path else 'inline'}"
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(what, [f"the file must hold a mapping with keys {', '.join(_TOP_KEYS)}; "
                                 f"got {type(raw).__name__}"])
    for key in sorted(set(raw) - set(_TOP_KEYS), key=str):
        problems.append(f"unknown top-level key {key!r}; valid keys: {', '.join(_TOP_KEYS)}")
    arch = raw.get("arch")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        problems.append(f"arch: unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    hints = _section_hints(arch)
    fixed = _check_fixed(raw.get("fixed", {}), arch, hints, problems)
    searched = raw.get("parameters")
    for name in sorted(set(fixed) & set(searched if isinstance(searched, dict) else {}), key=str):
        problems.append(f"{name} is both fixed and searched; remove it from one of the two")
    if isinstance(searched, dict):  # an override pins a searched parameter: it leaves the search
        searched = {k: v for k, v in searched.items() if k not in overrides}
    fixed.update(_check_fixed(dict(overrides), arch, hints, problems, source="override"))
    params = _check_parameters(searched, hints, problems)
    _check_conditions(params, problems)
    ordered = _dependency_order(params, problems)
    collect_problems(what, problems)
    space = SearchSpace(
        name=path.stem if path else "inline", arch=arch, parameters=ordered, fixed=fixed,
        overrides=dict(overrides), source=path, sha256=_content_hash(arch, fixed, searched), content=raw)
    collect_problems(what, _corner_problems(space))
    return space


def _section_hints(arch: Any) -> dict[str, dict[str, Any] | None]:
    """Field name -> type hint per section (None where the arch is unknown)."""
    out: dict[str, dict[str, Any] | None] = {}
    for section in SECTIONS:
        cls = section_class(section, arch) if isinstance(arch, str) else None
        out[section] = _field_hints(cls) if cls is not None else None
    return out


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _resolve_name(name: Any, hints: Mapping[str, dict[str, Any] | None], problems: list[str]) -> Any:
    """The type hint of ``section.field``; records a problem and returns None if unknown.

    Returns ``Any`` when the section is known but its class is not (unknown arch).
    """
    if not isinstance(name, str) or name.count(".") != 1:
        problems.append(f"{name!r}: names must read section.field with section one of {', '.join(SECTIONS)}")
        return None
    section, fld = name.split(".")
    if section not in SECTIONS:
        problems.append(f"{name}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
        return None
    fields = hints[section]
    if fields is None:
        return Any
    if fld not in fields:
        problems.append(f"{name}: unknown field {fld!r} of the {section} config; valid fields: {', '.join(fields)}")
        return None
    return fields[fld]


def _check_fixed(raw: Any, arch: Any, hints: Mapping[str, dict[str, Any] | None],
                 problems: list[str], source: str = "fixed") -> dict[str, Any]:
    """The fixed values; a file's (``source="fixed"``) may not repeat a default."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{source}: must be a mapping of section.field: value, got {type(raw).__name__}")
        return {}
    fixed: dict[str, Any] = {}
    for name, value in raw.items():
        hint = _resolve_name(name, hints, problems)
        if hint is not None and not _conforms(value, hint):
            problems.append(f"{source} {name}: value {value!r} is not a {_hint_text(hint)}")
        elif source == "fixed" and hint not in (None, Any) and _same(value, _default(arch, name)):
            problems.append(f"fixed {name}: {value!r} is already the dataclass default; drop it "
                            f"(each default has one home, the dataclass)")
        fixed[name] = value
    return fixed


def _check_parameters(raw: Any, hints: Mapping[str, dict[str, Any] | None],
                      problems: list[str]) -> list[Parameter]:
    if not isinstance(raw, dict) or not raw:
        problems.append(f"parameters: must be a non-empty mapping of section.field: {{kind: ...}}, got {raw!r}")
        return []
    params = []
    for name, spec in raw.items():
        hint = _resolve_name(name, hints, problems)
        param = _parse_parameter(str(name), spec, problems)
        if param.kind and hint is not None:
            _check_types(param, hint, problems)
        params.append(param)
    return params


def _parse_parameter(name: str, spec: Any, problems: list[str]) -> Parameter:
    """One ``{kind: args, [step, log, when]}`` entry.

    An entry that cannot be read comes back with kind ``""`` (its problems
    recorded), so that the checks of names and ``when`` still cover it.
    """
    if not isinstance(spec, dict):
        problems.append(f"{name}: must be a mapping like {{choice: [a, b]}} or {{uniform: [low, high]}}, got {spec!r}")
        return Parameter(name, "")
    when = _parse_when(name, spec.get("when"), problems)
    kinds = [k for k in spec if k in KINDS]
    extra = [k for k in spec if k not in (*KINDS, "step", "log", "when")]
    for k in extra:
        problems.append(f"{name}: unknown kind or option {k!r}; valid kinds: {', '.join(KINDS)}; "
                        f"options: step (uniform, int), log (int), when")
    if len(kinds) != 1:
        if not extra:
            problems.append(f"{name}: needs exactly one kind of {', '.join(KINDS)}, got {kinds or 'none'}")
        return Parameter(name, "", when=when)
    kind = kinds[0]
    for k in spec:
        if k in ("step", "log") and k not in _OPTIONS[kind]:
            problems.append(f"{name}: option {k!r} does not apply to {kind}; it takes {list(_OPTIONS[kind]) or 'none'}")
    if kind == "choice":
        return _parse_choice(name, spec["choice"], when, problems)
    return _parse_range(name, kind, spec, when, problems)


def _parse_choice(name: str, values: Any, when: tuple[Condition, ...], problems: list[str]) -> Parameter:
    if not isinstance(values, list) or not values:
        problems.append(f"{name}: choice needs a non-empty list of values, got {values!r}")
        return Parameter(name, "", when=when)
    labels = [_label(v) for v in values]
    if len({json.dumps(x, sort_keys=True) for x in labels}) != len(labels):
        problems.append(f"{name}: choice values must be distinct, got {values!r}")
    return Parameter(name, "choice", choices=tuple(values), when=when)


def _parse_range(name: str, kind: str, spec: dict, when: tuple[Condition, ...],
                 problems: list[str]) -> Parameter:
    # An option that does not apply to the kind is reported by the caller; ignore it here.
    step = spec.get("step") if "step" in _OPTIONS[kind] else None
    bounds, log = spec[kind], spec.get("log", False) if "log" in _OPTIONS[kind] else False
    number = _is_int if kind == "int" else _is_number
    noun = "integers" if kind == "int" else "numbers"
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(number(b) for b in bounds)):
        text = [b for b in bounds if isinstance(b, str)] if isinstance(bounds, list) else []
        hint = f" (YAML reads {text[0]} as text: write the mantissa with a dot, e.g. 1.0e-3)" if text else ""
        problems.append(f"{name}: {kind} needs [low, high] as two {noun}, got {bounds!r}{hint}")
        return Parameter(name, "", when=when)
    low, high = bounds
    before = len(problems)
    if low > high:
        problems.append(f"{name}: low <= high must hold, but got low={low}, high={high}; swap them")
    if (kind == "loguniform" or log) and low <= 0:
        problems.append(f"{name}: a log scale needs low > 0, got low={low}")
    if not isinstance(log, bool):
        problems.append(f"{name}: log must be true or false, got {log!r}")
    if step is not None:
        _check_step(name, kind, low, high, step, bool(log), problems)
    if len(problems) > before:
        return Parameter(name, "", when=when)
    if kind == "int" and step is None:
        step = 1
    return Parameter(name, kind, low=low, high=high, step=step, log=bool(log), when=when)


def _check_step(name: str, kind: str, low: float, high: float, step: Any, log: bool, problems: list[str]) -> None:
    if not ((_is_int(step) if kind == "int" else _is_number(step)) and step > 0):
        problems.append(f"{name}: step must be a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
        return
    if log and step != 1:
        problems.append(f"{name}: log and step != 1 cannot be combined (Optuna refuses it); drop one")
    ratio = (high - low) / step
    if abs(ratio - round(ratio)) > 1e-9:
        problems.append(f"{name}: (high - low) must be a multiple of step, got [{low}, {high}] with step {step}; "
                        f"Optuna would silently lower high")


def _parse_when(name: str, raw: Any, problems: list[str]) -> tuple[Condition, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{name}: when must map parameter names to a value or {{in: [values]}}, got {raw!r}")
        return ()
    conditions = []
    for ref, expected in raw.items():
        if isinstance(expected, dict):
            if set(expected) != {"in"} or not isinstance(expected["in"], list) or not expected["in"]:
                problems.append(f"{name}: when {ref}: use a value or {{in: [v1, v2]}}, got {expected!r}")
                continue
            values = tuple(expected["in"])
        else:
            values = (expected,)
        conditions.append(Condition(str(ref), values))
    return tuple(conditions)


def _check_types(param: Parameter, hint: Any, problems: list[str]) -> None:
    """Every value the parameter can take must fit the dataclass field."""
    if param.kind == "choice":
        bad = [v for v in param.choices if not _conforms(v, hint)]
        if bad:
            problems.append(f"{param.name}: choice values {bad!r} are not of the field's type {_hint_text(hint)}")
        return
    sample = 1 if param.kind == "int" else 0.5
    if not _conforms(sample, hint):
        problems.append(f"{param.name}: kind {param.kind} gives {type(sample).__name__} values, but the field "
                        f"is {_hint_text(hint)}; use choice")


def _check_conditions(params: list[Parameter], problems: list[str]) -> None:
    by_name = {p.name: p for p in params}
    for p in params:
        for c in p.when:
            ref = by_name.get(c.parameter)
            if c.parameter == p.name:
                problems.append(f"{p.name}: when refers to the parameter itself")
            elif ref is None:
                problems.append(f"{p.name}: when refers to {c.parameter!r}, which is not searched; "
                                f"searched: {', '.join(sorted(by_name))}")
            elif not ref.kind:
                continue  # unreadable; its own problem is reported
            elif ref.kind != "choice":
                problems.append(f"{p.name}: when may only refer to a choice parameter; {c.parameter} is {ref.kind}")
            else:
                missing = [v for v in c.values if not ref.contains(v)]
                if missing:
                    problems.append(f"{p.name}: when {c.parameter} = {', '.join(map(repr, missing))} can never hold; "
                                    f"{c.parameter} takes {list(ref.choices)!r}")


def _dependency_order(params: list[Parameter], problems: list[str]) -> tuple[Parameter, ...]:
    """Parameters after those their ``when`` refers to (ties by name); reports cycles."""
    by_name = {p.name: p for p in params}
    deps = {p.name: {c.parameter for c in p.when if c.parameter in by_name and c.parameter != p.name}
            for p in params}
    ordered: list[Parameter] = []
    done: set[str] = set()
    while len(done) < len(deps):
        ready = sorted(n for n, d in deps.items() if n not in done and d <= done)
        if not ready:
            problems.append(f"when conditions form a cycle among {', '.join(_cycle_members(deps, done))}; "
                            f"one of them must be unconditional")
            break
        done.add(ready[0])
        ordered.append(by_name[ready[0]])
    return tuple(ordered)


def _cycle_members(deps: Mapping[str, set[str]], done: set[str]) -> list[str]:
    """The unresolved parameters minus those that merely depend on a cycle."""
    stuck = set(deps) - done
    while leaves := {n for n in stuck if not any(n in deps[m] for m in stuck)}:
        stuck -= leaves
    return sorted(stuck)


def _content_hash(arch: str, fixed: Mapping[str, Any], parameters: Mapping[str, Any]) -> str:
    canonical = json.dumps({"arch": arch, "fixed": fixed, "parameters": parameters},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- semantic (corner) check


def _corner_problems(space: SearchSpace) -> list[str]:
    """Problems the dataclasses report at the corner points, each named once."""
    found: dict[str, str] = {}
    for label, point in _corner_points(space):
        for problem in _build(space, point)[1]:
            found.setdefault(problem, label)
    return [f"{label}: {problem}" for problem, label in found.items()]


def _corner_points(space: SearchSpace) -> Iterator[tuple[str, dict[str, Any]]]:
    base = {p.name: p.corners()[0] for p in space.parameters}
    yield "with every parameter at its first choice or low bound", _active(space, base)
    for p in space.parameters:
        for value in p.corners():
            point = dict(base)
            _force_conditions(space, p, point)
            point[p.name] = value
            yield f"with {p.name}={value!r} (others at first choice or low bound)", _active(space, point)


def _force_conditions(space: SearchSpace, param: Parameter, point: dict[str, Any]) -> None:
    """Make ``param`` active: set what its ``when`` refers to (no cycles: checked before)."""
    for c in param.when:
        point[c.parameter] = c.values[0]
        _force_conditions(space, space.parameter(c.parameter), point)


def _active(space: SearchSpace, point: Mapping[str, Any]) -> dict[str, Any]:
    """The assignments whose conditions hold, in suggestion order."""
    out: dict[str, Any] = {}
    for p in space.parameters:
        if p.name in point and all(c.holds(out) for c in p.when):
            out[p.name] = point[p.name]
    return out


# --------------------------------------------------------------------------- Optuna and trial configs


def to_optuna(space: SearchSpace) -> Callable[[optuna.trial.Trial], None]:
    """The define-by-run function for ``OptunaSearch(space=...)``.

    Parameters are suggested in dependency order; a conditional parameter is
    suggested only when its ``when`` holds, so it is absent from the trial
    otherwise. Choice values that Optuna cannot store (lists) are suggested as
    their JSON text, e.g. ``"[1,2,2]"``; :func:`build_configs` decodes them.
    The function is a picklable object, because ``OptunaSearch.save`` pickles
    it with the searcher state when Tune checkpoints the experiment.

    Args:
        space: a validated space.

    Returns:
        ``fn(trial) -> None``; Tune's trial config is then the flat dict of the
        suggested values, ``{"model.width": 32, ...}``.
    """
    return _DefineByRun(space)


@dataclass(frozen=True)
class _DefineByRun:
    space: SearchSpace

    def __call__(self, trial: optuna.trial.Trial) -> None:
        chosen: dict[str, Any] = {}
        for p in self.space.parameters:
            if all(c.holds(chosen) for c in p.when):
                chosen[p.name] = _decode(p, _suggest(trial, p))


def _suggest(trial: optuna.trial.Trial, p: Parameter) -> Any:
    if p.kind == "choice":
        return trial.suggest_categorical(p.name, [_label(v) for v in p.choices])
    if p.kind == "int":
        return trial.suggest_int(p.name, p.low, p.high, step=p.step, log=p.log)
    if p.kind == "uniform":
        return trial.suggest_float(p.name, p.low, p.high, step=p.step)
    if p.kind == "loguniform":
        return trial.suggest_float(p.name, p.low, p.high, log=True)
    raise ValueError(f"{p.name}: unsupported kind {p.kind!r}; valid kinds: {', '.join(KINDS)}")


def build_configs(space: SearchSpace, flat_params: Mapping[str, Any]) -> TrialConfigs:
    """Turn a trial's flat dict plus the space's ``fixed`` into the typed configs.

    Args:
        space: the space the trial was drawn from.
        flat_params: ``{"model.width": 32, ...}`` as Tune passes it (choice lists
            may be given as values or as the JSON text :func:`to_optuna` suggests).

    Returns:
        The model, loss and optimizer configs; lists become tuples where the
        field is a tuple; settings not in the space keep their dataclass defaults.

    Raises:
        ConfigError: listing every problem: unknown, missing or inactive
            parameters, values outside the space, and what the dataclasses and
            the model/loss pair check reject.
    """
    what = f"trial configuration for search space {space.name!r}"
    decoded, problems = _check_assignment(space, flat_params)
    collect_problems(what, problems)
    configs, problems = _build(space, decoded)
    collect_problems(what, problems)
    assert configs is not None  # no problems means every config was built
    return configs


def _check_assignment(space: SearchSpace, flat: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    searched = [p.name for p in space.parameters]
    for key in sorted(set(flat) - set(searched), key=str):
        problems.append(f"{key!r} is not a parameter of this space; parameters: {', '.join(searched)}")
    decoded: dict[str, Any] = {}
    for p in space.parameters:
        active = all(c.holds(decoded) for c in p.when)
        if p.name not in flat:
            if active:
                problems.append(f"{p.name} is missing; its conditions hold, so it needs a value")
            continue
        if not active:
            problems.append(f"{p.name} is given but its condition {_when_text(p.when)} does not hold; drop it")
            continue
        value = _decode(p, flat[p.name])
        if not p.contains(value):
            problems.append(f"{p.name}: {flat[p.name]!r} lies outside the space ({_values_text(p)})")
        decoded[p.name] = value
    return decoded, problems


def _build(space: SearchSpace, params: Mapping[str, Any]) -> tuple[TrialConfigs | None, list[str]]:
    """Construct the three configs and run the pair check, collecting every problem."""
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, value in {**space.fixed, **params}.items():
        section, fld = name.split(".")
        values[section][fld] = value
    problems: list[str] = []
    built: dict[str, Any] = {}
    for section in SECTIONS:
        cls = section_class(section, space.arch)
        hints = _field_hints(cls)
        kwargs = {k: _coerce(v, hints.get(k, Any)) for k, v in values[section].items()}
        try:
            built[section] = cls(**kwargs)
        except ConfigError as e:
            problems += [f"{section} ({cls.__name__}): {p}" for p in e.problems]
        except (TypeError, ValueError) as e:
            problems.append(f"{section} ({cls.__name__}): {e}")
    if problems:
        return None, problems
    try:
        validate_model_and_loss(built["model"], built["loss"], built["optimizer"])
    except ConfigError as e:
        problems += [f"configs together: {p}" for p in e.problems]
    if problems:
        return None, problems
    return TrialConfigs(space.arch, built["model"], built["loss"], built["optimizer"], built["trainer"]), []


# --------------------------------------------------------------------------- the study's epoch budget

#: Warm-ups measured in epochs, and what a run that never leaves one trains instead.
WARMUPS: dict[str, str] = {
    "optimizer.warmup": "its learning rate would still be ramping up when it ends",
    "loss.mse_warmup_epochs": "it would fit the mean by MSE only and never train the NLL it is ranked and exported by",
}


def check_space_budget(space: SearchSpace, max_epochs: int) -> None:
    """Check a space against a study's epoch budget, before any trial; every problem at once.

    A trial trains ``max_epochs`` epochs at most (ASHA's ``max_t``), and that is
    also its schedule's horizon. Each warm-up the space searches or fixes
    (:data:`WARMUPS`) must end before it at every value it can take, or the
    trials drawn there train only their warm-up. A warm-up the space leaves at
    its dataclass default is not a problem: :func:`fit_budget` turns a default
    that does not fit off. The horizon itself is the study's, never the space's.

    Args:
        space: a validated space.
        max_epochs: the study's ``--max-epochs``.

    Raises:
        ConfigError: listing every problem, each with its fix.
    """
    what = f"search space {space.name!r} for --max-epochs {max_epochs}"
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        collect_problems(what, [f"--max-epochs must be an integer >= 1, got {max_epochs!r}"])
    problems = [f"{name} is set by the space, but a study's epoch budget is --max-epochs (ASHA's max_t); remove it"
                for name in ("optimizer.max_epochs",) if name in _chosen(space)]
    for name, consequence in WARMUPS.items():
        top = _largest_value(space, name)
        if top is None or top < max_epochs:
            continue
        how = "is fixed at" if name in space.fixed else "can reach"
        needed = math.floor(top) + 1
        below = f"at most {max_epochs - 1}" if name == "loss.mse_warmup_epochs" else f"below {max_epochs}"
        problems.append(f"{name} {how} {top:g} epochs, not less than --max-epochs {max_epochs}: {consequence}; "
                        f"fix: keep its values {below} in the space, or raise --max-epochs to {needed}")
    collect_problems(what, problems)


def check_space_devices(space: SearchSpace, gpus_per_worker: float) -> None:
    """Check the precisions a space can give its trials against the study's devices, before any trial.

    A space that fixes or searches ``trainer.precision`` overrides the study's
    ``--precision`` for its trials; ``16-mixed`` needs a GPU, so on CPU workers
    (``gpus_per_worker`` 0) it is refused now rather than in every trial drawn there.

    Args:
        space: a validated space.
        gpus_per_worker: the study's ``--gpus-per-worker``.

    Raises:
        ConfigError: the problem, with its fix.
    """
    name = "trainer.precision"
    if name in space.fixed:
        values: tuple[Any, ...] = (space.fixed[name],)
    else:
        try:
            values = space.parameter(name).choices
        except KeyError:
            return
    problems = []
    if not gpus_per_worker and "16-mixed" in values:
        how = "is fixed at" if name in space.fixed else "can be"
        problems.append(f"{name} {how} 16-mixed, which needs a GPU (float16 autocast on a CPU is slower than float32 "
                        f"and loses range), but --gpus-per-worker is 0: the trials train on CPUs; fix: drop 16-mixed "
                        f"from the space (bf16-mixed runs on CPUs), or give each worker a GPU with --gpus-per-worker")
    collect_problems(f"search space {space.name!r} on the study's devices", problems)


def budget_overrides(space: SearchSpace, max_epochs: int) -> dict[str, Any]:
    """Overrides that pin every warm-up of the space that reaches ``max_epochs`` to 0.

    For a run meant to be short whatever the space says (``--smoke-test``):
    ``with_overrides(space, budget_overrides(space, 1))`` passes
    :func:`check_space_budget`. A real study should fix the space instead.
    """
    return {name: 0 if name == "loss.mse_warmup_epochs" else 0.0 for name in WARMUPS
            if (_largest_value(space, name) or 0) >= max_epochs}


def fit_budget(configs: TrialConfigs, max_epochs: int, chosen: Collection[str] = ()) -> TrialConfigs:
    """The configs of a run of ``max_epochs`` epochs: the one warm-up policy of studies and ``tuning.train``.

    The schedule's horizon (``optimizer.max_epochs``) becomes ``max_epochs``,
    never longer: a run cut short of its horizon would end untrained in the way
    the horizon implies (lr still high, MSE warm-up unfinished). A warm-up of
    :data:`WARMUPS` that does not end before ``max_epochs`` is then turned off
    (0) when it is a dataclass default nobody chose, as in a one-epoch smoke
    test, and is an error when it was chosen.

    Args:
        configs: a trial's configs (:func:`build_configs`).
        max_epochs: epochs the run trains.
        chosen: ``section.field`` names the user set (a space's parameters and
            fixed values, a command's flags); only their warm-ups are kept as given.

    Returns:
        The fitted configs.

    Raises:
        ConfigError: a chosen warm-up does not end before ``max_epochs`` (or the
            configs do not fit together), every problem listed.
    """
    opt, loss = configs.optimizer, configs.loss
    loss_changes = {}
    if "loss.mse_warmup_epochs" not in chosen and loss.mse_warmup_epochs >= max_epochs:
        loss_changes["mse_warmup_epochs"] = 0
    opt_changes: dict[str, Any] = {"max_epochs": max_epochs}
    if "optimizer.warmup" not in chosen and opt.warmup >= max_epochs:
        opt_changes["warmup"] = 0.0
    problems = [f"{name} is {value:g} epochs, not less than the run's {max_epochs}: {WARMUPS[name]}; fix: lower it "
                f"or train longer" for name, value in (("optimizer.warmup", opt.warmup),
                                                       ("loss.mse_warmup_epochs", loss.mse_warmup_epochs))
                if name in chosen and value >= max_epochs]
    collect_problems(f"configuration for a run of {max_epochs} epoch(s)", problems)
    fitted = dataclasses.replace(configs, optimizer=dataclasses.replace(opt, **opt_changes),
                                 loss=dataclasses.replace(loss, **loss_changes))
    validate_model_and_loss(fitted.model, fitted.loss, fitted.optimizer)
    return fitted


def _chosen(space: SearchSpace) -> set[str]:
    """Every ``section.field`` the space searches or fixes (overrides included)."""
    return set(space.fixed) | {p.name for p in space.parameters}


def _largest_value(space: SearchSpace, name: str) -> float | None:
    """The largest number ``name`` takes in the space (None when the space leaves it at its default)."""
    if name in space.fixed:
        value = space.fixed[name]
        return float(value) if _is_number(value) else None
    try:
        p = space.parameter(name)
    except KeyError:
        return None
    values = [v for v in p.corners() if _is_number(v)]
    return float(max(values)) if values else None


# --------------------------------------------------------------------------- summary


def space_summary(space: SearchSpace) -> str:
    """A readable table of the space for ``--dry-run``: parameters, fixed values, defaults.

    Args:
        space: a validated space.

    Returns:
        Multi-line text.
    """
    rows = [(p.name, p.kind + (" (log)" if p.log else ""), _values_text(p), _when_text(p.when) or "-")
            for p in space.parameters]
    header = ("parameter", "kind", "values", "when")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [f"search space {space.name!r}: arch {space.arch}, {len(rows)} parameters, "
             f"sha256 {space.sha256[:12]}, from {space.source or 'inline'}", ""]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    lines.append("")
    fixed = [f"{k}={v!r}" + (" (override)" if k in space.overrides else "") for k, v in sorted(space.fixed.items())]
    lines.append("fixed: " + (", ".join(fixed) or "-"))
    for section in SECTIONS:
        cls = section_class(section, space.arch)
        taken = {p.field for p in space.parameters if p.section == section}
        taken |= {k.split(".")[1] for k in space.fixed if k.startswith(section + ".")}
        rest = [f"{f.name}={_default_of(f)!r}" for f in dataclasses.fields(cls) if f.init and f.name not in taken]
        lines.append(f"{section} defaults ({cls.__name__}): {', '.join(rest) or '-'}")
    return "\n".join(lines)


def _default(arch: str, name: str) -> Any:
    """The dataclass default of ``section.field`` (both known)."""
    section, fld = name.split(".")
    return next(_default_of(f) for f in dataclasses.fields(section_class(section, arch)) if f.name == fld)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "<required>"


def _values_text(p: Parameter) -> str:
    if p.kind == "choice":
        return ", ".join(json.dumps(v) if not isinstance(v, str) else v for v in p.choices)
    step = f" step {p.step}" if p.step not in (None, 1) else ""
    return f"[{p.low}, {p.high}]{step}"


def _when_text(when: tuple[Condition, ...]) -> str:
    return " and ".join(f"{c.parameter} = {c.values[0]}" if len(c.values) == 1
                        else f"{c.parameter} in {list(c.values)}" for c in when)


# --------------------------------------------------------------------------- value helpers


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps True apart from 1 and [1, 2] equal to (1, 2)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _label(value: Any) -> Any:
    """What Optuna stores for a choice: the value if scalar, else its JSON text."""
    return value if isinstance(value, _SCALARS) else json.dumps(value, separators=(",", ":"))


def _decode(p: Parameter, value: Any) -> Any:
    """Map a JSON label back to the choice it stands for (values pass through)."""
    if p.kind == "choice" and isinstance(value, str):
        for c in p.choices:
            if not isinstance(c, _SCALARS) and _label(c) == value:
                return c
    return value


def _conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the type hint; True where the hint cannot be checked here."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(_same(value, a) for a in args)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (bool, str):
        return isinstance(value, hint)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_int(value) or isinstance(value, float)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args))
    return True


def _coerce(value: Any, hint: Any) -> Any:
    """YAML lists become tuples and ints become floats where the field says so."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        arm = next((a for a in args if _conforms(value, a)), Any)
        return _coerce(value, arm)
    if hint is float and _is_int(value):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(_coerce(v, a) for v, a in zip(value, args)) if len(args) == len(value) else tuple(value)
    return value


def _hint_text(hint: Any) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")
