"""Tasks, adapters, dataset readers and encoder schemes are found through entry points, ours and
third parties' alike.

* ``e2_plugins.tasks``: a :class:`Task` (or a plain function, named after its entry point); its
  ``run`` function's keyword parameters are its options.
* ``e2_plugins.adapters``: an :class:`Adapter` (or a plain function ``encoder -> object``) that
  puts an encoder into another library's form (``e2_core.adapt(encoder, NAME)``).
* ``e2_plugins.datasets``: a :class:`DatasetReader` (or a plain function
  ``open(root, split, **options) -> ProductDataset``), opened by ``--dataset NAME``.
* ``e2_plugins.encoders``: a function ``NAME -> Encoder or checkpoint path``, making the encoder
  source ``SCHEME:NAME`` (e.g. ``demo:e2``).
* ``e2_plugins.cir_methods``, ``e2_plugins.caption_methods``, ``e2_plugins.training_methods``: a method
  class of the ``cir`` task (``e2_cir.CIRMethod``), of the ``caption`` task (``e2_caption.Captioner``)
  or of the trainer (``e2_train.TrainingMethod``); ``--method`` offers what is installed.

Listing reads metadata; an entry point is imported only when it is loaded, and a failure to
load is reported, never raised past the CLI. A third-party ``pyproject.toml``::

    [project.entry-points."e2_plugins.tasks"]
    my-task = "my_package.task:task"
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Iterable, Iterator, List, Mapping, Optional, Sequence

TASK_GROUP = "e2_plugins.tasks"
ADAPTER_GROUP = "e2_plugins.adapters"
DATASET_GROUP = "e2_plugins.datasets"
ENCODER_GROUP = "e2_plugins.encoders"
CIR_METHOD_GROUP = "e2_plugins.cir_methods"
CAPTION_METHOD_GROUP = "e2_plugins.caption_methods"
TRAINING_METHOD_GROUP = "e2_plugins.training_methods"
GROUPS = {"tasks": TASK_GROUP, "adapters": ADAPTER_GROUP, "datasets": DATASET_GROUP, "encoders": ENCODER_GROUP,
          "CIR methods": CIR_METHOD_GROUP, "caption methods": CAPTION_METHOD_GROUP,
          "training methods": TRAINING_METHOD_GROUP}


@dataclass(frozen=True)
class Task:
    """A command ``e2-plugins run NAME`` runs. ``run`` takes plain keyword values and returns a
    JSON-serialisable dict of results; its signature and docstring become the command's options."""

    name: str
    run: Callable[..., Any]
    description: str = ""
    #: option name -> a function giving its choices now (e.g. the installed methods of a registry)
    choices: Mapping[str, Callable[[], Sequence[str]]] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        return self.description or (inspect.getdoc(self.run) or "").split("\n")[0]


@dataclass(frozen=True)
class DatasetReader:
    """A dataset ``--dataset NAME`` opens: ``open(root, split, **options)``, a ``ProductDataset`` when
    ``kind`` is ``products``, a FashionIQ-style set of one category when ``triplets`` (composed retrieval).

    Opening has no side effects. ``prepare(root) -> message``, when given, makes the data where it is
    missing (``open_dataset(..., prepare=True)`` runs it first; e.g. generating the synthetic data).
    """

    name: str
    open: Callable[..., Any]
    description: str = ""
    prepare: Optional[Callable[..., Optional[str]]] = None
    kind: str = "products"

    @property
    def summary(self) -> str:
        return self.description or (inspect.getdoc(self.open) or "").split("\n")[0]


@dataclass(frozen=True)
class Adapter:
    """Puts an :class:`~e2_core.Encoder` into another library's form: ``adapt(encoder, **options)``.

    ``requires`` names the library it needs and ``install`` how to get it; both are shown by
    ``e2-plugins list`` and in the error when the library is missing.
    """

    name: str
    adapt: Callable[..., Any]
    description: str = ""
    requires: str = ""
    install: str = ""

    @property
    def summary(self) -> str:
        return self.description or (inspect.getdoc(self.adapt) or "").split("\n")[0]


@dataclass
class Plugin:
    """An entry point, the distribution that provides it, and, once loaded, its object or error."""

    name: str
    group: str
    value: str
    distribution: str
    entry_point: Any = None
    obj: Any = None
    error: Optional[str] = None

    def load(self) -> Any:
        if self.obj is None and self.error is None:
            try:
                self.obj = _WRAP.get(self.group, lambda name, obj: obj)(self.name, self.entry_point.load())
            except Exception as err:  # a broken plugin must not take the tool down
                self.error = f"{type(err).__name__}: {err}"
        if self.error is not None:
            raise PluginLoadError(f'failed to load plugin "{self.name}" from {self.distribution} '
                                  f'({self.value}) due to {self.error}')
        return self.obj


class PluginLoadError(RuntimeError):
    pass


def _wrapper(kind: type, field: str):
    """An entry point's object as ``kind``: itself, or ``kind(name=..., <field>=function)`` for a plain function."""
    def wrap(name: str, obj: Any):
        if isinstance(obj, kind):
            return obj
        if callable(obj):
            return kind(name=name, **{field: obj})
        raise TypeError(f"entry point must be an e2_core.registry.{kind.__name__} or a function, "
                        f"got {type(obj).__name__}")
    return wrap


_WRAP = {TASK_GROUP: _wrapper(Task, "run"), DATASET_GROUP: _wrapper(DatasetReader, "open"),
         ADAPTER_GROUP: _wrapper(Adapter, "adapt")}


def discover(group: str, eps: Optional[Iterable[EntryPoint]] = None) -> List[Plugin]:
    """Entry points of ``group`` (metadata only, nothing imported), sorted by name."""
    eps = entry_points(group=group) if eps is None else eps
    plugins = []
    for ep in eps:
        dist = getattr(ep, "dist", None)
        dist_name = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"
        plugins.append(Plugin(ep.name, group, ep.value, dist_name, entry_point=ep))
    return sorted(plugins, key=lambda p: p.name)


def get(group: str, name: str, eps: Optional[Iterable[EntryPoint]] = None) -> Any:
    """Load one plugin of ``group`` by name; an unknown name lists the installed ones."""
    plugins = {p.name: p for p in discover(group, eps)}
    if name not in plugins:
        kind = next((k for k, g in GROUPS.items() if g == group), f"{group} plugins")
        raise KeyError(f"unknown {kind[:-1]} {name!r}; installed {kind}: {', '.join(plugins) or 'none'}")
    return plugins[name].load()


class Registry(MappingABC):
    """The plugins of one entry-point group as a read-only mapping, name -> loaded object: ``list(r)``
    names the installed ones (nothing imported), ``r[name]`` loads one (an unknown name lists them).

        >>> METHODS = Registry(CIR_METHOD_GROUP)          # doctest: +SKIP
        >>> METHODS["searle"], list(METHODS)              # doctest: +SKIP
    """

    def __init__(self, group: str):
        self.group = group

    def __getitem__(self, name: str) -> Any:
        return get(self.group, name)

    def __contains__(self, name: object) -> bool:
        return name in list(self)

    def __iter__(self) -> Iterator[str]:
        return iter([plugin.name for plugin in discover(self.group)])

    def __len__(self) -> int:
        return len(discover(self.group))

    def __repr__(self) -> str:
        return f"Registry({self.group!r}: {', '.join(self)})"


def get_task(name: str, eps: Optional[Iterable[EntryPoint]] = None) -> Task:
    """Load one task by name; an unknown name lists the installed ones."""
    return get(TASK_GROUP, name, eps)


def get_adapter(name: str, eps: Optional[Iterable[EntryPoint]] = None) -> Adapter:
    """Load one adapter by name; an unknown name lists the installed ones."""
    return get(ADAPTER_GROUP, name, eps)


def get_dataset(name: str, eps: Optional[Iterable[EntryPoint]] = None) -> DatasetReader:
    """Load one dataset reader by name; an unknown name lists the installed ones."""
    return get(DATASET_GROUP, name, eps)
