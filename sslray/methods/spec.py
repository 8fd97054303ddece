"""The torch-free types of the method registry: :class:`TermConfig` (a term's typed settings), :class:`Term` (a
loss term), :class:`Family` (terms sharing heads or state) and :class:`NonFiniteLossError`.

``sslray.config`` builds ``MethodConfig`` from ``sslray.methods.registry`` (presets, terms and their settings
classes), and the light commands (``sslray status``, ``table``, ``list``, ``validate``) load studies through it,
so nothing here imports torch: a term's function and a family's builder are a :class:`Ref` (the registry names the
method module; it is imported when a trial builds its method), or the callable itself (a plugin's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class TermConfig:
    """A loss term's settings: its weight, plus settings in subclasses (a term's ``config_cls`` in ``TERMS``).

    ``sslray.config`` builds these from YAML like any config section: unknown keys and wrong types are errors,
    ``CHOICES`` (class attribute, setting -> allowed values) are checked, the weight must be >= 0, and then
    ``problems()`` reports what the generic rules miss.
    """

    weight: float = 1.0

    def problems(self) -> list[tuple[str, str]]:
        """Invalid settings as (setting, what was expected); subclasses check ranges the generic rules miss."""
        return []


def raise_problems(problems: list[tuple[str, str]]) -> None:
    """For a family's ``build``: the first problem of its ``check`` as a ValueError naming the dotted key."""
    for key, message in problems:
        raise ValueError(f"method.terms.{key}: {message}")


class Ref:
    """Code named but not imported yet: ``load()`` returns it (the registry imports its method module, by an
    explicit import statement: nothing is imported by a name read from input)."""

    __slots__ = ("load", "name")

    def __init__(self, load: Callable[[], Callable[..., Any]], name: str):
        self.load, self.name = load, name

    def __repr__(self) -> str:
        return self.name


def resolve(ref: "Callable[..., Any] | Ref") -> Callable[..., Any]:
    """The callable itself, or a :class:`Ref` loaded now."""
    return ref.load() if isinstance(ref, Ref) else ref


class Term:
    """A loss term: ``fn(outputs, settings, ctx) -> scalar tensor``.

    ``needs`` names what the shared step must compute for it: ``u`` (unlabeled batch, teacher
    pseudo-labels), ``s1``/``s2`` (student on a strong view), ``fp`` (feature-perturbed weak view), ``w``
    (student on the weak view, with gradient, even under an EMA teacher). A term of a ``family`` is called
    as ``fn(outputs, settings, ctx, module)`` with the family's shared ``MethodModule``. ``fn`` may be a
    :class:`Ref`, loaded on first use (the registry stays free of torch).
    """

    __slots__ = ("_fn", "config_cls", "needs", "doc", "family")

    def __init__(self, fn: "Callable[..., Any] | Ref", config_cls: type, needs: frozenset[str], doc: str,
                 family: str | None = None):
        self._fn, self.config_cls, self.needs, self.doc, self.family = fn, config_cls, frozenset(needs), doc, family

    @property
    def fn(self) -> Callable[..., Any]:
        if isinstance(self._fn, Ref):
            self._fn = self._fn.load()
        return self._fn

    def __repr__(self) -> str:
        return f"Term({self._fn!r}, {self.config_cls.__name__}, {sorted(self.needs)}, family={self.family!r})"


class Family:
    """Builds the heads/state shared by a family's terms: ``build(active term settings, ModuleContext)``.

    ``check(active term settings)`` returns what is inconsistent across the family's terms as (``<term>.<setting>``,
    message) pairs; config validation calls it, so a study with such a method fails before anything starts.
    ``build`` may be a :class:`Ref` (loaded when a trial builds the method); ``check`` runs at config time and must
    not need torch.
    """

    __slots__ = ("_build", "doc", "check")

    def __init__(self, build: "Callable[..., Any] | Ref", doc: str,
                 check: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None):
        self._build, self.doc, self.check = build, doc, check

    @property
    def build(self) -> Callable[..., Any]:
        if isinstance(self._build, Ref):
            self._build = self._build.load()
        return self._build


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf; names the iteration and the first offending term."""

    def __init__(self, iteration: int, term: str, value: float):
        self.iteration, self.term, self.value = iteration, term, value
        super().__init__(f"non-finite loss at iteration {iteration}: term {term!r} = {value}")
