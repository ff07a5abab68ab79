"""``Support``: the answer of ``Plugin.supports`` and ``ModelAdapter.check``: yes, or no with a human reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Support:
    """``ok``; or not, with a ``reason``. ``applicable=False`` marks a plugin with nothing to do here (MoE routing
    on a dense model, a GPU-only gain on the CPU): it is skipped like any other, but ``strict=True`` accepts it."""

    ok: bool
    reason: str = ""
    applicable: bool = True

    @classmethod
    def yes(cls) -> Support:
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> Support:
        if not reason:
            raise ValueError("Support.no() needs a reason the user can act on")
        return cls(False, reason)

    @classmethod
    def not_applicable(cls, reason: str) -> Support:
        if not reason:
            raise ValueError("Support.not_applicable() needs a reason")
        return cls(False, reason, applicable=False)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return "supported" if self.ok else self.reason
