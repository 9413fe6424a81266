"""The declared-state file (YAML): models, variants, pins, adapters and aliases, parsed into frozen dataclasses.

Every problem is reported with the path of the entry and field it concerns (`models[2].source.hub.revision: must be
a string`); see docs/declared-state.md for the schema."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from model_manager.names import hub_revision_problem, name_problem, parse_variant, repo_id_problem

VERSION = 1
# What a Hub pull may fetch as the base weights (a repository carries fp32 files and sometimes fp16 ones).
PULL_VARIANTS = ("fp32", "fp16")
# What the sidecar can make from a stored revision (fp32 comes from a pull or an import).
MADE_VARIANTS = ("fp16", "bf16", "int8")
# The largest weight of a canary alias target (as SetAlias allows).
MAX_WEIGHT = 1_000_000


class DeclaredStateError(ValueError):
    """The file cannot be used; `problems` holds one 'path: rule' line per problem found."""

    def __init__(self, problems: list[str]):
        super().__init__("invalid declared state: " + "; ".join(problems))
        self.problems = tuple(problems)


@dataclasses.dataclass(frozen=True)
class HubSource:
    """A Hub repository at a revision (branch, tag or commit); `variant`: the weights to fetch (fp32 or fp16)."""

    repo: str
    revision: str = "main"
    variant: str = "fp32"
    filename: str = ""  # adapters only: the file to take (empty: the repository's only .safetensors file)


@dataclasses.dataclass(frozen=True)
class LocalSource:
    """A diffusers folder or a single-file .safetensors checkpoint under one of the sidecar's --import-roots."""

    path: str
    architecture: str = ""
    config_from: str = ""


Source = HubSource | LocalSource


@dataclasses.dataclass(frozen=True)
class DeclaredModel:
    """A model to hold: its source, the variants to make from it, and its pin (None: left as it is)."""

    index: int
    name: str
    source: Source
    variants: tuple[str, ...] = ()
    pin: bool | None = None

    @property
    def entry(self) -> str:
        return f"models[{self.index}]"


@dataclasses.dataclass(frozen=True)
class DeclaredAdapter:
    """An adapter to hold (a LoRA or textual-inversion file), from the Hub or a local file."""

    index: int
    name: str
    source: Source
    token: str = ""

    @property
    def entry(self) -> str:
        return f"adapters[{self.index}]"


@dataclasses.dataclass(frozen=True)
class DeclaredAlias:
    """An alias and its target: a declared model, and optionally one of its variants (empty: the best one)."""

    name: str
    model: str
    variant: str = ""
    # A canary alias: (model, variant, weight) per target, the first being model/variant; empty for a plain alias.
    weighted: tuple[tuple[str, str, int], ...] = ()

    @property
    def entry(self) -> str:
        return f"aliases.{self.name}"

    @property
    def target(self) -> str:
        if self.weighted:
            return " | ".join(f"{m}:{v}*{w}" if v else f"{m}*{w}" for m, v, w in self.weighted)
        return f"{self.model}:{self.variant}" if self.variant else self.model

    @property
    def models(self) -> tuple[str, ...]:
        """The declared models it points at (a canary alias: each target's)."""
        return tuple(m for m, _, _ in self.weighted) or (self.model,)


@dataclasses.dataclass(frozen=True)
class DeclaredState:
    """The whole file."""

    models: tuple[DeclaredModel, ...] = ()
    adapters: tuple[DeclaredAdapter, ...] = ()
    aliases: tuple[DeclaredAlias, ...] = ()

    def alias(self, name: str) -> DeclaredAlias | None:
        """The declared alias `name`, if the file declares it."""
        return next((a for a in self.aliases if a.name == name), None)


class _Reader:
    """Collects problems while reading plain YAML values at a path."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, rule: str) -> None:
        self.problems.append(f"{path}: {rule}")

    def mapping(
        self, value: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """The mapping at `path` (empty after a problem); unknown and missing keys are problems."""
        if not isinstance(value, dict):
            self.fail(path, "must be a mapping")
            return {}
        for key in value:
            if key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key), f"unknown field; expected one of {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.fail(f"{path}.{key}" if path else key, "is required")
        return {k: v for k, v in value.items() if k in allowed}

    def string(
        self, data: Mapping[str, Any], key: str, path: str, check: Callable[[str], str | None] | None = None
    ) -> str:
        """The string at `path` ('' when absent or bad); `check` returns why a value is not allowed."""
        if key not in data:
            return ""
        value = data[key]
        if not isinstance(value, str):
            self.fail(path, "must be a string")
            return ""
        problem = check(value) if check is not None else None
        if problem:
            self.fail(path, problem)
            return ""
        return value

    def items(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, "must be a list")
            return []
        return value


def _absolute(value: str) -> str | None:
    return None if value.startswith("/") and "\0" not in value else "must be an absolute path on the sidecar's machine"


def _one_of(allowed: tuple[str, ...]) -> Callable[[str], str | None]:
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}, got {v!r}"


def _filename(value: str) -> str | None:
    bad = ".." in value.split("/") or value.startswith("/") or "\0" in value
    return "must be a relative path inside the repository" if bad else None


def _source(r: _Reader, value: Any, path: str, adapter: bool) -> Source | None:
    """`source:` with exactly one of `hub:` or `local:`."""
    data = r.mapping(value, path, ("hub", "local"))
    if len(data) != 1:
        if data or isinstance(value, dict):
            r.fail(path, "must have exactly one of hub or local")
        return None
    if "hub" in data:
        hub_path = f"{path}.hub"
        hub_extra = ("filename",) if adapter else ("variant",)
        hub = r.mapping(data["hub"], hub_path, ("repo", "revision", *hub_extra), ("repo",))
        repo = r.string(hub, "repo", f"{hub_path}.repo", repo_id_problem)
        revision = r.string(hub, "revision", f"{hub_path}.revision", hub_revision_problem) or "main"
        variant = r.string(hub, "variant", f"{hub_path}.variant", _one_of(PULL_VARIANTS)) or "fp32"
        filename = r.string(hub, "filename", f"{hub_path}.filename", _filename)
        return HubSource(repo, revision, variant, filename) if repo else None
    local_path = f"{path}.local"
    local_extra: tuple[str, ...] = () if adapter else ("architecture", "config_from")
    local = r.mapping(data["local"], local_path, ("path", *local_extra), ("path",))
    where = r.string(local, "path", f"{local_path}.path", _absolute)
    architecture = r.string(local, "architecture", f"{local_path}.architecture")
    config_from = r.string(local, "config_from", f"{local_path}.config_from")
    return LocalSource(where, architecture, config_from) if where else None


def _variants(r: _Reader, value: Any, path: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(r.items(value, path)):
        if not isinstance(item, str):
            r.fail(f"{path}[{i}]", "must be a string")
        elif item not in MADE_VARIANTS:
            r.fail(
                f"{path}[{i}]", f"must be one of {', '.join(MADE_VARIANTS)} (fp32 comes from the source), got {item!r}"
            )
        elif item in out:
            r.fail(f"{path}[{i}]", f"{item} is listed twice")
        else:
            out.append(item)
    return tuple(out)


def _model(r: _Reader, index: int, value: Any) -> DeclaredModel | None:
    path = f"models[{index}]"
    data = r.mapping(value, path, ("name", "source", "variants", "pin"), ("name", "source"))
    name = r.string(data, "name", f"{path}.name", name_problem)
    source = _source(r, data["source"], f"{path}.source", adapter=False) if "source" in data else None
    variants = _variants(r, data.get("variants"), f"{path}.variants")
    pin = data.get("pin")
    if pin is not None and not isinstance(pin, bool):
        r.fail(f"{path}.pin", "must be true or false")
        pin = None
    if not name or source is None:
        return None
    return DeclaredModel(index, name, source, variants, pin)


def _adapter(r: _Reader, index: int, value: Any) -> DeclaredAdapter | None:
    path = f"adapters[{index}]"
    data = r.mapping(value, path, ("name", "source", "token"), ("name", "source"))
    name = r.string(data, "name", f"{path}.name", name_problem)
    source = _source(r, data["source"], f"{path}.source", adapter=True) if "source" in data else None
    token = r.string(data, "token", f"{path}.token")
    if not name or source is None:
        return None
    return DeclaredAdapter(index, name, source, token)


def _alias(
    r: _Reader, name: Any, value: Any, models: Mapping[str, DeclaredModel], named: Mapping[Any, None]
) -> DeclaredAlias | None:
    path = f"aliases.{name}"
    problem = name_problem(name) if isinstance(name, str) else "an alias name must be a string"
    if problem:
        r.fail(path, f"the alias name {problem}")
        return None
    if name in models:
        r.fail(path, f"{name!r} is a declared model name; an alias must not hide a model")
        return None
    if isinstance(value, dict):
        return _weighted_alias(r, name, value, models, named)
    if not isinstance(value, str):
        r.fail(path, "must be a model name, name:variant, or a mapping of those to weights (a canary alias)")
        return None
    found = _alias_target(r, path, value, models, named)
    return None if found is None else DeclaredAlias(name, *found)


def _weighted_alias(
    r: _Reader, name: str, value: dict[Any, Any], models: Mapping[str, DeclaredModel], named: Mapping[Any, None]
) -> DeclaredAlias | None:
    """A canary alias `{model[:variant]: weight, ...}`: two or more targets, each model once, whole weights >= 1."""
    path = f"aliases.{name}"
    if len(value) < 2:
        r.fail(path, "a canary alias maps two or more targets to weights (one target: write it as a string)")
        return None
    targets: list[tuple[str, str, int]] = []
    for raw, weight in value.items():
        where = f"{path}.{raw}"
        if not isinstance(raw, str):
            r.fail(where, "a target must be a model name, or name:variant")
            return None
        if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
            r.fail(where, f"the weight must be a whole number from 1 to {MAX_WEIGHT}, got {weight!r}")
            return None
        found = _alias_target(r, where, raw, models, named)
        if found is None:
            return None
        if any(m == found[0] for m, _, _ in targets):
            r.fail(where, f"{found[0]!r} is named twice; a canary alias names each model once")
            return None
        targets.append((*found, weight))
    return DeclaredAlias(name, targets[0][0], targets[0][1], tuple(targets))


def _alias_target(
    r: _Reader, path: str, value: str, models: Mapping[str, DeclaredModel], named: Mapping[Any, None]
) -> tuple[str, str] | None:
    """(model, variant) of an alias target `model` or `model:variant`, checked against the declared models."""
    model, _, variant = value.partition(":")
    if model not in models:
        if model in named:
            return None
        declared = ", ".join(sorted(models)) or "none"
        r.fail(path, f"{model!r} is not a model declared in this file (declared: {declared})")
        return None
    if variant:
        try:
            parse_variant(variant)
        except ValueError as exc:
            r.fail(path, f"the variant {variant!r} {exc}")
            return None
        source = models[model].source
        made = models[model].variants
        if isinstance(source, HubSource) and variant not in (*made, source.variant):
            r.fail(path, f"{model} has no {variant} variant here: add {variant} to its variants")
            return None
    return model, variant


def _unique(r: _Reader, entries: list[Any], kind: str) -> None:
    seen: dict[str, int] = {}
    for e in entries:
        if e.name in seen:
            r.fail(f"{e.entry}.name", f"{e.name!r} is already declared by {kind}[{seen[e.name]}]")
        seen.setdefault(e.name, e.index)


def parse(text: str | bytes) -> DeclaredState:
    """Parses and validates the file's text; raises DeclaredStateError listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise DeclaredStateError([f"(file): not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"]) from None
    if raw is not None and not isinstance(raw, dict):
        raise DeclaredStateError(["(file): must be a mapping with version, models, adapters and aliases"])
    r = _Reader()
    data = r.mapping(raw or {}, "", ("version", "models", "adapters", "aliases"))
    version = data.get("version", VERSION)
    if version != VERSION or isinstance(version, bool):
        r.fail("version", f"must be {VERSION}")
    models = [m for i, v in enumerate(r.items(data.get("models"), "models")) if (m := _model(r, i, v))]
    adapters = [a for i, v in enumerate(r.items(data.get("adapters"), "adapters")) if (a := _adapter(r, i, v))]
    _unique(r, models, "models")
    _unique(r, adapters, "adapters")
    by_name = {m.name: m for m in models}
    raw_aliases = data.get("aliases") or {}
    if not isinstance(raw_aliases, dict):
        r.fail("aliases", "must be a mapping of alias name to model name or name:variant")
        raw_aliases = {}
    # Models whose entries have problems are still named, so their aliases are not reported as unknown too.
    raw_models = data.get("models")
    named = {m.get("name"): None for m in raw_models if isinstance(m, dict)} if isinstance(raw_models, list) else {}
    aliases = [al for k, v in raw_aliases.items() if (al := _alias(r, k, v, by_name, named))]
    if r.problems:
        raise DeclaredStateError(r.problems)
    return DeclaredState(tuple(models), tuple(adapters), tuple(aliases))
