"""The patch recorder: every change a plugin makes to a model goes through it, so it can be undone exactly.

Changes are recorded on the model's own instances (its modules, its config), never on classes shared by other
models. ``rollback()`` undoes them in reverse order; a failing undo does not stop the others.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_MISSING = object()


@dataclass(frozen=True)
class Change:
    """One recorded change, with the closure that undoes it and a one-line description for the report."""

    description: str
    undo: Callable[[], None]


class PatchRecorder:
    """Records changes so they can be rolled back. Use its methods instead of assigning attributes directly."""

    def __init__(self) -> None:
        self._changes: list[Change] = []
        self._owner: str | None = None  # plugin currently applying (for descriptions)

    def __len__(self) -> int:
        return len(self._changes)

    @property
    def changes(self) -> tuple[Change, ...]:
        return tuple(self._changes)

    def owned_by(self, owner: str | None) -> None:
        """Attribute the following changes to ``owner`` (the plugin being applied)."""
        self._owner = owner

    def _record(self, description: str, undo: Callable[[], None]) -> None:
        prefix = f"[{self._owner}] " if self._owner else ""
        self._changes.append(Change(prefix + description, undo))

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """Set ``obj.name = value`` (a module swap, parameter, buffer, config field or plain attribute)."""
        previous = _current_value(obj, name)
        setattr(obj, name, value)

        def undo() -> None:
            if previous is _MISSING:
                if _current_value(obj, name) is not _MISSING:
                    delattr(obj, name)
            else:
                setattr(obj, name, previous)

        self._record(f"set {type(obj).__name__}.{name}", undo)

    def replace_module(self, parent: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
        """Swap the child module ``parent.name`` for ``new`` and return the old one."""
        old = parent._modules.get(name)
        if not isinstance(old, torch.nn.Module):
            raise AttributeError(f"{type(parent).__name__} has no child module {name!r}")
        self.setattr(parent, name, new)
        return old

    def register_buffer(self, module: torch.nn.Module, name: str, tensor: torch.Tensor | None, *,
                        persistent: bool = False) -> None:
        """Add a new buffer to ``module`` (non-persistent by default, so ``state_dict`` is unchanged)."""
        if _current_value(module, name) is not _MISSING or hasattr(type(module), name):
            raise AttributeError(f"{type(module).__name__} already has an attribute {name!r}")
        module.register_buffer(name, tensor, persistent=persistent)
        self._record(f"buffer {type(module).__name__}.{name}", lambda: delattr(module, name))

    def bind_method(self, obj: Any, name: str, function: Callable[..., Any]) -> None:
        """Shadow ``obj.name`` with ``function`` bound to this instance only (the class is untouched)."""
        self.setattr(obj, name, types.MethodType(function, obj))

    def register_forward_hook(self, module: torch.nn.Module, hook: Callable[..., Any], *, pre: bool = False,
                              **kwargs: Any) -> None:
        """Register a forward (or pre-forward) hook that is removed on rollback."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handle = register(hook, **kwargs)
        self._record(f"{'pre-' if pre else ''}forward hook on {type(module).__name__}", handle.remove)

    def on_rollback(self, description: str, undo: Callable[[], None]) -> None:
        """Record an arbitrary change made by the caller, with the function that undoes it."""
        self._record(description, undo)

    def rollback(self) -> list[BaseException]:
        """Undo every change, newest first. Returns the errors of undos that failed (normally none)."""
        errors: list[BaseException] = []
        while self._changes:
            change = self._changes.pop()
            try:
                change.undo()
            except Exception as exc:  # keep undoing the rest; report afterwards
                errors.append(exc)
        return errors


def _current_value(obj: Any, name: str) -> Any:
    """The value ``obj.name`` holds on the instance itself (not one inherited from its class), or _MISSING."""
    if isinstance(obj, torch.nn.Module):
        for store in ("_parameters", "_buffers", "_modules"):
            table = obj.__dict__.get(store, {})
            if name in table:
                return table[name]
    instance_dict = getattr(obj, "__dict__", {})
    if name in instance_dict:
        return instance_dict[name]
    # A property or other descriptor on the class (e.g. PretrainedConfig._attn_implementation): read it through
    # the descriptor so that undo writes the old value back through the same setter.
    descriptor = getattr(type(obj), name, _MISSING)
    if isinstance(descriptor, property):
        return getattr(obj, name)
    return _MISSING
