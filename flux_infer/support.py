"""``Support``: the answer of ``Plugin.supports`` and ``ModelAdapter.check``: yes, or no with a human reason."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Support:
    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> Support:
        return cls(True)

    @classmethod
    def no(cls, reason: str) -> Support:
        if not reason:
            raise ValueError("Support.no() needs a reason the user can act on")
        return cls(False, reason)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return "supported" if self.ok else self.reason
