"""Applicability: which items a tool can work on, in the words of the domain cards' traits."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from anomalyclaw.domains import TRAITS
from anomalyclaw.items import Item

_NEEDS_REFS = re.compile(r"^references>=(\d+)$")


@dataclass(frozen=True)
class Applicability:
    """Which items a tool can work on, in the words of :data:`anomalyclaw.domains.TRAITS`.

    ``requires``: traits that must all be present, or special needs such as ``"references>=2"``;
    ``any_of``: at least one of these traits (empty: no condition); ``excludes``: none of these;
    ``note``: what the tool needs, in words; ``instead``: the tool to suggest when it does not apply.
    """

    requires: frozenset[str] = frozenset()
    any_of: frozenset[str] = frozenset()
    excludes: frozenset[str] = frozenset()
    note: str = ""
    instead: str = ""

    def __post_init__(self) -> None:
        for name in ("requires", "any_of", "excludes"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        words = self.requires | self.any_of | self.excludes
        unknown = {w for w in words if w not in TRAITS and not _NEEDS_REFS.match(w)}
        if unknown:
            raise ValueError(f"unknown applicability words {sorted(unknown)}; use traits "
                             f"{sorted(TRAITS)} or 'references>=N'")

    def check(self, item: Item) -> tuple[bool, str]:
        """(applicable, why not): ``why`` names the domain, its traits and an alternative tool."""
        traits = item.traits
        card = item.domain_card
        domain = f"{item.domain_code} {card.name}" + (f" ({item.category})" if item.category else "")
        has = f"{domain} has traits [{', '.join(sorted(traits)) or 'none'}]"
        hint = f"; use {self.instead} instead" if self.instead else ""
        for need in sorted(self.requires):
            match = _NEEDS_REFS.match(need)
            if match:
                n = int(match.group(1))
                if len(item.ref_paths) < n:
                    return False, (f"needs at least {n} reference images; item {item.item_id} has "
                                   f"{len(item.ref_paths)}{hint}")
            elif need not in traits:
                return False, f"needs trait '{need}' ({TRAITS[need]}); {has}{hint}"
        if self.any_of and not (self.any_of & traits):
            return False, f"needs one of the traits {sorted(self.any_of)}; {has}{hint}"
        clash = self.excludes & traits
        if clash:
            return False, f"does not apply to items with trait(s) {sorted(clash)}; {has}{hint}"
        return True, ""

    def to_json(self) -> dict[str, Any]:
        return {"requires": sorted(self.requires), "any_of": sorted(self.any_of),
                "excludes": sorted(self.excludes), "note": self.note, "instead": self.instead}
