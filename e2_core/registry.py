"""Tasks and adapters are found through entry points, ours and third parties' alike.

A *task* is a :class:`Task` (or a plain function, named after its entry point) in the group
``e2_plugins.tasks``; its ``run`` function's keyword parameters are its options. An *adapter*
is any object in the group ``e2_plugins.adapters``. Listing reads metadata; an entry point is
imported only when it is loaded, and a failure to load is reported, never raised past the CLI.

A third-party ``pyproject.toml``::

    [project.entry-points."e2_plugins.tasks"]
    my-task = "my_package.task:task"
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable, Iterable, List, Optional

TASK_GROUP = "e2_plugins.tasks"
ADAPTER_GROUP = "e2_plugins.adapters"


@dataclass(frozen=True)
class Task:
    """A command ``e2-plugins run NAME`` runs. ``run`` takes plain keyword values and returns a
    JSON-serialisable dict of results; its signature and docstring become the command's options."""

    name: str
    run: Callable[..., Any]
    description: str = ""

    @property
    def summary(self) -> str:
        return self.description or (inspect.getdoc(self.run) or "").split("\n")[0]


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
                self.obj = _as_task(self.name, self.entry_point.load()) if self.group == TASK_GROUP \
                    else self.entry_point.load()
            except Exception as err:  # a broken plugin must not take the tool down
                self.error = f"{type(err).__name__}: {err}"
        if self.error is not None:
            raise PluginLoadError(f'failed to load plugin "{self.name}" from {self.distribution} '
                                  f'({self.value}) due to {self.error}')
        return self.obj


class PluginLoadError(RuntimeError):
    pass


def _as_task(name: str, obj: Any) -> Task:
    if isinstance(obj, Task):
        return obj
    if callable(obj):
        return Task(name=name, run=obj)
    raise TypeError(f"entry point must be an e2_core.registry.Task or a function, got {type(obj).__name__}")


def discover(group: str, eps: Optional[Iterable[EntryPoint]] = None) -> List[Plugin]:
    """Entry points of ``group`` (metadata only, nothing imported), sorted by name."""
    eps = entry_points(group=group) if eps is None else eps
    plugins = []
    for ep in eps:
        dist = getattr(ep, "dist", None)
        dist_name = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "unknown distribution"
        plugins.append(Plugin(ep.name, group, ep.value, dist_name, entry_point=ep))
    return sorted(plugins, key=lambda p: p.name)


def get_task(name: str, eps: Optional[Iterable[EntryPoint]] = None) -> Task:
    """Load one task by name; an unknown name lists the installed ones."""
    tasks = {p.name: p for p in discover(TASK_GROUP, eps)}
    if name not in tasks:
        known = ", ".join(tasks) or "none installed"
        raise KeyError(f"unknown task {name!r}; installed tasks: {known}")
    return tasks[name].load()
