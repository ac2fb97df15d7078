"""Prompt templates as text files, loaded by name; a user folder overrides any of them.

Templates use ``string.Template`` placeholders (``$tools``, ``$domain_card`` ...) so that the
JSON examples inside them need no escaping. The tool list is rendered from the registry at run
time, so adding or dropping a tool never needs a prompt edit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

from anomalyclaw.errors import ConfigError

__all__ = ["PROMPT_NAMES", "PromptSet"]

#: The templates the graphs use, and the placeholders each may contain.
PROMPT_NAMES = {
    "refute_system": set(),
    "propose": {"domain_card", "n_refs", "reference_note", "tools", "max_turns", "max_candidates", "format"},
    "refute": {"tool", "turn", "candidate", "observation", "open_candidates", "turns_note", "format"},
    "commit": {"summary", "format"},
    "direct_system": set(),
    "direct": {"descriptor", "n_refs", "format"},
    "direct_logprob": {"descriptor", "n_refs"},
    "repair": {"problem", "format"},
    # The multiple-choice task (--task mcqa).
    "mcq_direct_system": set(),
    "mcq_direct": {"domain_card", "n_refs"},
    "mcq_question": {"question", "options", "format"},
    "mcq_system": set(),
    "mcq_propose": {"domain_card", "n_refs", "reference_note", "question", "options", "tools", "max_turns", "format"},
    "mcq_refute": {"tool", "turn", "candidate", "observation", "question", "open_options", "turns_note", "format"},
    "mcq_commit": {"summary", "question", "options", "format"},
    "mcq_repair": {"problem", "format"},
}


@dataclass(frozen=True)
class PromptSet:
    """The prompt texts by name. ``PromptSet.load(folder)`` takes ``folder/<name>.txt`` where
    present and the packaged default otherwise."""

    texts: dict[str, str] = field(default_factory=dict)
    source: str = "default"

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "PromptSet":
        texts = {name: resources.files(__package__).joinpath(f"{name}.txt").read_text(encoding="utf-8")
                 for name in PROMPT_NAMES}
        source = "default"
        if folder is not None:
            root = Path(folder).expanduser()
            if not root.is_dir():
                raise ConfigError(f"prompt folder {root} does not exist")
            overridden = []
            for name in PROMPT_NAMES:
                p = root / f"{name}.txt"
                if p.is_file():
                    texts[name] = p.read_text(encoding="utf-8")
                    overridden.append(name)
            unknown = sorted(p.stem for p in root.glob("*.txt") if p.stem not in PROMPT_NAMES)
            if unknown:
                raise ConfigError(f"prompt folder {root} has files no graph uses: {unknown}; "
                                  f"known names: {sorted(PROMPT_NAMES)}")
            source = f"{root} ({', '.join(overridden) or 'nothing overridden'})"
        for name, text in texts.items():
            _check_placeholders(name, text)
        return cls(texts, source)

    def with_text(self, name: str, text: str) -> "PromptSet":
        """A copy with one template replaced (for experiments in a notebook)."""
        if name not in PROMPT_NAMES:
            raise ConfigError(f"unknown prompt {name!r}; known: {sorted(PROMPT_NAMES)}")
        _check_placeholders(name, text)
        return PromptSet({**self.texts, name: text}, f"{self.source} + custom {name}")

    def render(self, name: str, **values: object) -> str:
        return Template(self.texts[name]).substitute({k: str(v) for k, v in values.items()}).strip()


def _check_placeholders(name: str, text: str) -> None:
    used = {m.group("named") or m.group("braced") for m in Template.pattern.finditer(text)
            if m.group("named") or m.group("braced")}
    unknown = used - PROMPT_NAMES[name]
    if unknown:
        raise ConfigError(f"prompt {name!r} uses unknown placeholders {sorted(unknown)}; "
                          f"it may use {sorted(PROMPT_NAMES[name])}")
