"""The audit type, the registry, and the context every audit is given.

An audit is one object (an :class:`Audit` subclass, instantiated once by
:func:`register`) in one module of this package. :func:`registered` imports
every module of the package, so a new audit is a new file that decorates its
class with ``@register``; nothing else names it. The orchestrator
(:func:`simulations.audits.run_audits`) and the page (``html.py``) iterate the
registry.

What an audit returns is a JSON-able dict that goes into ``audit.json`` under
its name. An audit that needs ground truth the run does not have (canaries and
the PII sidecar that only the data generator plants, hold-out users, a
baseline run) returns :func:`skipped` with the reason instead of failing.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simulations.audits.report_html import Section
    from simulations.audits.view import RunView

# "fast" audits run at both levels; "full" audits only at level full.
LEVELS = ("fast", "full")

PASSED, FAILED, MEASURED, SKIPPED, NOT_RUN = "passed", "FAILED", "measured", "skipped", "not run"


class AuditFailure(RuntimeError):
    """An audit found what it looks for (a ledger disagreement, PII on the wire, a bound above the formal epsilon).

    ``result`` is the whole audit result (also written to ``audit.json``).
    """

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result


def skipped(reason: str) -> dict:
    """The result of an audit (or a part of one) that could not run on this run, and why."""
    return {"skipped": reason}


def is_skipped(result) -> bool:
    return isinstance(result, dict) and set(result) == {"skipped"}


@dataclass
class AuditContext:
    """What an audit may look at: the run (through :class:`RunView`), the level, and a baseline run."""

    run_dir: Path
    level: str = "full"
    baseline_dir: Path | None = None

    @cached_property
    def view(self) -> "RunView":
        from simulations.audits.view import RunView

        return RunView(self.run_dir)

    @cached_property
    def baseline(self) -> "RunView | None":
        from simulations.audits.view import RunView

        return RunView(self.baseline_dir) if self.baseline_dir is not None else None


class Audit:
    """One audit of a finished run. Subclass it, set the attributes, and decorate the class with :func:`register`."""

    name: str = ""  # key in audit.json; the HTML section id is the name with '-' for '_'
    title: str = ""
    level: str = "fast"  # the lowest level that runs it
    order: int = 100  # position in audit.json and on the page
    method: str = ""  # how it is done, shown with its section
    criterion: str | None = None  # what fails it; None: a measurement without a pass/fail criterion

    def run(self, ctx: AuditContext) -> dict:
        raise NotImplementedError

    def section(self, result: dict, ctx: AuditContext) -> "Section | None":
        """The audit's HTML section for a result that is not skipped (None: no section)."""
        return None

    def failure(self, result: dict) -> str | None:
        """Why ``result`` fails the audit (counts and names only, never user text), or None."""
        return None

    def summary(self, result: dict) -> str | None:
        """One line for the console."""
        return None

    @property
    def section_id(self) -> str:
        return self.name.replace("_", "-")

    def runs_at(self, level: str) -> bool:
        return LEVELS.index(level) >= LEVELS.index(self.level)

    def verdict(self, result: dict) -> dict:
        """``{"status", "detail"}`` of a result: skipped (reason), FAILED (why), passed or measured (summary)."""
        if is_skipped(result):
            return {"status": SKIPPED, "detail": result["skipped"]}
        why = self.failure(result)
        if why:
            return {"status": FAILED, "detail": why}
        return {"status": PASSED if self.criterion else MEASURED, "detail": self.summary(result) or ""}


REGISTRY: dict[str, Audit] = {}
_discovered = False


def register(cls: type[Audit]) -> type[Audit]:
    """Class decorator: add one instance of ``cls`` to the registry (each name once)."""
    audit = cls()
    if not audit.name or not audit.name.replace("_", "").isalnum():
        raise ValueError(f"{cls.__name__}: an audit needs a name of letters, digits and '_'")
    if audit.level not in LEVELS:
        raise ValueError(f"{cls.__name__}: level must be one of {LEVELS}")
    held = REGISTRY.get(audit.name)
    if held is not None and (type(held).__module__, type(held).__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"two audits named {audit.name!r}: {type(held).__module__} and {cls.__module__}")
    REGISTRY[audit.name] = audit
    return cls


def registered() -> list[Audit]:
    """Every audit of the package, in page order (importing each module of the package once)."""
    global _discovered
    if not _discovered:
        package = importlib.import_module(__package__)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{__package__}.{module.name}")
        _discovered = True
    return sorted(REGISTRY.values(), key=lambda a: (a.order, a.name))
