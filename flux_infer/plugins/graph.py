"""Turn a config into a ``Plan``: select plugins, pull in requirements, drop unsupported ones, settle
conflicts, order the rest. Pure logic over plugin metadata; the model is only seen through ``supports``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

from flux_infer.config import InferenceConfig
from flux_infer.errors import (
    DependencyCycleError,
    MissingRequirementError,
    PluginConflictError,
    UnknownPluginError,
    UnsupportedModelError,
)
from flux_infer.plugins.base import Plugin
from flux_infer.report import Skipped
from flux_infer.support import Support

EXPLICIT = "requested"
LEVEL = "level preset"


@dataclasses.dataclass(frozen=True)
class PlannedStep:
    plugin: Plugin
    origin: str  # "requested", "level preset" or "required by <name>"

    @property
    def name(self) -> str:
        return self.plugin.name


@dataclasses.dataclass(frozen=True)
class Plan:
    """The ordered plugins ``optimize`` would apply, and every wanted plugin it would skip, with the reason."""

    config: InferenceConfig  # resolved
    model_type: str
    adapter: str | None
    steps: tuple[PlannedStep, ...]
    skipped: tuple[Skipped, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)

    def __str__(self) -> str:
        lines = [f"plan for {self.model_type} at {self.config.optimization_level} "
                 f"(adapter: {self.adapter or 'none'}):"]
        if not self.steps:
            lines.append("  (nothing to apply)")
        for i, step in enumerate(self.steps, 1):
            kind = "lossless" if step.plugin.lossless else "lossy"
            lines.append(f"  {i}. {step.name:<22} {kind:<9} ({step.origin})")
        for s in self.skipped:
            lines.append(f"  - {s.name:<22} skipped: {s.reason}")
        return "\n".join(lines)


def resolve(
    registry: Mapping[str, Plugin],
    config: InferenceConfig,
    supports: Callable[[Plugin], Support],
    *,
    model_type: str,
    adapter: str | None,
    strict: bool = False,
) -> Plan:
    """Build the plan. ``registry`` is name -> plugin in registration order; ``config`` must be resolved."""
    unknown = sorted(set(config.plugins + config.exclude) - set(registry))
    if unknown:
        raise UnknownPluginError(
            f"unknown plugin(s) {', '.join(map(repr, unknown))}; registered plugins are "
            f"{', '.join(registry)} (`flux-infer plugins` lists them with their packages)"
        )
    order = {name: i for i, name in enumerate(registry)}
    selected: dict[str, str] = {}  # name -> origin
    skipped: dict[str, str] = {}
    for plugin in registry.values():
        if plugin.name in config.exclude:
            if plugin.enabled(config):
                skipped[plugin.name] = "excluded by InferenceConfig.exclude"
        elif plugin.name in config.plugins or plugin.enabled(config):
            selected[plugin.name] = EXPLICIT if plugin.explicitly_requested(config) else LEVEL

    _pull_requirements(registry, config, selected)

    benign: set[str] = set()  # skipped as not applicable: strict mode accepts these
    for name in list(selected):
        answer = supports(registry[name])
        if not answer:
            if not answer.applicable:
                benign.add(name)
            elif strict:
                raise UnsupportedModelError(f"plugin {name!r} cannot be applied to this {model_type} model: "
                                            f"{answer.reason} (strict=True; without it the plugin is skipped)")
            skipped[name] = answer.reason
            del selected[name]

    _cascade_unmet(registry, selected, skipped, benign, strict=strict)
    _settle_conflicts(registry, selected, skipped, benign, order)
    _cascade_unmet(registry, selected, skipped, benign, strict=strict)

    ordered = _toposort(registry, list(selected), order)
    return Plan(
        config=config,
        model_type=model_type,
        adapter=adapter,
        steps=tuple(PlannedStep(registry[n], selected[n]) for n in ordered),
        skipped=tuple(Skipped(n, r) for n, r in sorted(skipped.items(), key=lambda kv: order[kv[0]])),
    )


def _providers(registry: Mapping[str, Plugin], capability: str) -> list[Plugin]:
    return [p for p in registry.values() if capability in p.provides]


def _provided(registry: Mapping[str, Plugin], names: Sequence[str]) -> set[str]:
    return {cap for n in names for cap in registry[n].provides}


def _pull_requirements(registry: Mapping[str, Plugin], config: InferenceConfig, selected: dict[str, str]) -> None:
    """Add, transitively, a provider for every requirement of a selected plugin."""
    queue = list(selected)
    while queue:
        plugin = registry[queue.pop(0)]
        for capability in sorted(plugin.requires):
            if capability in _provided(registry, list(selected)):
                continue
            providers = _providers(registry, capability)
            allowed = [p for p in providers if p.name not in config.exclude]
            if not allowed:
                if providers:
                    excluded = ", ".join(p.name for p in providers)
                    raise MissingRequirementError(
                        f"plugin {plugin.name!r} requires {capability!r}, which only {excluded} provides, but it is "
                        f"excluded; remove it from InferenceConfig.exclude or also exclude {plugin.name!r}"
                    )
                raise MissingRequirementError(
                    f"plugin {plugin.name!r} requires {capability!r}, but no registered plugin provides it; install "
                    f"a package that provides it or exclude {plugin.name!r} (InferenceConfig(exclude=[{plugin.name!r}]))"
                )
            provider = allowed[0]
            selected[provider.name] = f"required by {plugin.name}"
            queue.append(provider.name)


def _cascade_unmet(registry: Mapping[str, Plugin], selected: dict[str, str], skipped: dict[str, str],
                   benign: set[str], *, strict: bool) -> None:
    """Skip selected plugins whose requirement lost its provider (skipped as unsupported), to a fixpoint."""
    changed = True
    while changed:
        changed = False
        provided = _provided(registry, list(selected))
        for name in list(selected):
            missing = sorted(registry[name].requires - provided)
            if not missing:
                continue
            causes = [p for cap in missing for p in _providers(registry, cap) if p.name in skipped]
            why = "; ".join(
                f"{cap!r} from {p.name}, which was skipped ({skipped[p.name]})"
                for cap in missing for p in _providers(registry, cap) if p.name in skipped
            ) or ", ".join(map(repr, missing))
            if causes and all(p.name in benign for p in causes):
                benign.add(name)
            elif strict:
                raise UnsupportedModelError(f"plugin {name!r} cannot be applied: it requires {why}")
            skipped[name] = f"requires {why}"
            del selected[name]
            changed = True


def _conflict_reason(a: Plugin, b: Plugin) -> str | None:
    shared = sorted(a.provides & b.provides)
    if shared:
        return f"both provide {', '.join(map(repr, shared))}"
    for x, y in ((a, b), (b, a)):
        hits = sorted(x.conflicts & ({y.name} | y.provides))
        if hits:
            return f"{x.name} declares a conflict with {', '.join(map(repr, hits))}"
    return None


def _settle_conflicts(registry: Mapping[str, Plugin], selected: dict[str, str], skipped: dict[str, str],
                      benign: set[str], order: Mapping[str, int]) -> None:
    """A plugin the user asked for replaces a conflicting one that only the level preset enabled; of two that
    the level preset enabled, the one registered first wins (a preset is a best effort, not a request). Two
    conflicting plugins the user asked for are an error that names both."""
    names = list(selected)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a not in selected or b not in selected:
                continue
            reason = _conflict_reason(registry[a], registry[b])
            if reason is None:
                continue
            a_explicit, b_explicit = selected[a] == EXPLICIT, selected[b] == EXPLICIT
            if a_explicit != b_explicit:
                keep, drop = (a, b) if a_explicit else (b, a)
                skipped[drop] = f"replaced by {keep}, which was requested explicitly ({reason})"
                del selected[drop]
                continue
            if not a_explicit and not b_explicit:
                keep, drop = sorted((a, b), key=order.__getitem__)
                skipped[drop] = f"conflicts with {keep}, which the level also enables ({reason})"
                benign.add(drop)
                del selected[drop]
                continue
            raise PluginConflictError(
                f"plugins {a!r} and {b!r} conflict ({reason}); enable only one, e.g. "
                f"InferenceConfig(exclude=[{b!r}]) or InferenceConfig(exclude=[{a!r}])"
            )


def _toposort(registry: Mapping[str, Plugin], names: list[str], order: Mapping[str, int]) -> list[str]:
    """Order by requires/after/before (names or capabilities); ties keep registration order."""
    def matches(token: str) -> list[str]:
        return [n for n in names if n == token or token in registry[n].provides]

    edges: dict[str, set[str]] = {n: set() for n in names}  # n -> plugins that must come after n
    for n in names:
        plugin = registry[n]
        for token in (*plugin.requires, *plugin.after):
            for m in matches(token):
                if m != n:
                    edges[m].add(n)
        for token in plugin.before:
            for m in matches(token):
                if m != n:
                    edges[n].add(m)
    indegree = {n: 0 for n in names}
    for targets in edges.values():
        for t in targets:
            indegree[t] += 1
    ready = sorted((n for n in names if indegree[n] == 0), key=order.__getitem__)
    result: list[str] = []
    while ready:
        n = ready.pop(0)
        result.append(n)
        for t in edges[n]:
            indegree[t] -= 1
            if indegree[t] == 0:
                ready.append(t)
        ready.sort(key=order.__getitem__)
    if len(result) < len(names):
        cycle = _find_cycle(edges, [n for n in names if n not in result])
        raise DependencyCycleError(
            f"plugins form an ordering cycle: {' must come before '.join(cycle)}; their requires/after/before declarations "
            f"contradict each other: exclude one of {', '.join(sorted(set(cycle)))} or fix its metadata"
        )
    return result


def _find_cycle(edges: Mapping[str, set[str]], candidates: list[str]) -> list[str]:
    """One cycle among ``candidates``, as a closed path. Every candidate still has a predecessor among the
    candidates (that is why it was never ready), so walking predecessors must revisit a node."""
    remaining = set(candidates)
    preds = {n: sorted(m for m in remaining if n in edges[m]) for n in remaining}
    path, seen = [candidates[0]], {candidates[0]}
    while True:
        prev = preds[path[-1]][0]
        if prev in seen:
            cycle = path[path.index(prev):]
            cycle.reverse()
            return cycle + [cycle[0]]
        path.append(prev)
        seen.add(prev)
