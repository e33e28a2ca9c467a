"""The ``e2-plugins`` command line: ``list``, ``info MODEL``, ``run TASK``, ``train``, ``data WHAT``.

Only this module parses arguments: a task's options come from its ``run`` function's signature.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from e2_core import registry
from e2_core.errors import MethodsFailed

from .commands import COMMANDS, DATA_BUILDERS


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="e2-plugins", description="E2 fashion representations and the "
                                     "downstream tasks that use them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("list", help="installed tasks, adapters, datasets and encoder schemes, with the distribution "
                   "providing each")
    info = sub.add_parser("info", help="parameters per component of an E2 model and its overhead over CLIP")
    info.add_argument("model", nargs="?", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    info.add_argument("--pretrained", default=None, help="open_clip tag, CLIP weights file, or any encoder source")
    run = sub.add_parser("run", help="run a task: e2-plugins run TASK [options] (TASK --help for its options)",
                         add_help=False)
    run.add_argument("task", nargs="?", help="task name (see `e2-plugins list`)")
    sub.add_parser("train", help="train E2 or the CLIP-FT baseline (train --help for options)", add_help=False)
    data = sub.add_parser("data", help="build a dataset: data synthetic | data amazon-fashion", add_help=False)
    data.add_argument("what", nargs="?", help="synthetic or amazon-fashion")
    args, rest = parser.parse_known_args(argv)
    _configure_logging()

    try:
        if args.command == "list":
            return _list()
        if args.command == "info":
            _reject_extra(parser, rest)
            return _info(args.model, args.pretrained)
        if args.command == "run":
            return _run(args.task, rest)
        if args.command == "train":
            return _execute(COMMANDS["train"], rest)
        if args.command == "data":
            if args.what not in DATA_BUILDERS:
                asked = args.what in ("-h", "--help") or any(a in ("-h", "--help") for a in rest)
                print(f"usage: e2-plugins data {{{','.join(DATA_BUILDERS)}}} [options]\n"
                      + "".join(f"  {name:<16}{task.summary}\n" for name, task in DATA_BUILDERS.items())
                      + "(e2-plugins data NAME --help for its options)", file=sys.stdout if asked else sys.stderr)
                return 0 if asked else 2
            return _execute(DATA_BUILDERS[args.what], rest)
    except ERRORS as err:
        print(f"e2-plugins: error: {_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ne2-plugins: interrupted (run the same command again: train continues from its last checkpoint, "
              "embed --shard-size from its last finished shard)", file=sys.stderr)
        return 130
    _reject_extra(parser, rest)
    parser.print_help()
    return 0


#: errors shown as one line (an ImportError: an optional dependency missing, its message says what to install)
ERRORS = (KeyError, ValueError, TypeError, OSError, ImportError, registry.PluginLoadError, MethodsFailed)
#: the packages whose progress notes (``logging`` at INFO) the command line shows
PACKAGES = ("e2_core", "e2_data", "e2_train", "e2_eval", "e2_plugins", "e2_retrieval", "e2_cir", "e2_caption",
            "e2_embed", "e2_open_clip", "e2_transformers", "e2_diffusers", "e2_clip_benchmark")


class _Stderr(logging.StreamHandler):
    """Plain lines on whatever ``sys.stderr`` is at the time (the library's notes, as the command line shows them)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler sets it; the current sys.stderr is used instead
        pass


def _shown(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in PACKAGES


def _configure_logging() -> None:
    """One handler on the root logger, installed once: this package's notes from INFO and everyone's warnings,
    on stderr as plain lines (a library's root-level ``logging.info`` then finds a handler and configures none
    of its own, which would print every note twice)."""
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        handler = _Stderr()
        handler.addFilter(_shown)
        root.addHandler(handler)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.INFO)


def _message(err: Exception) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:    # the system's own words
        return f"{err.filename}: {err.strerror}" + (f" (-> {err.filename2})" if err.filename2 else "")
    return str(err.args[0] if isinstance(err, KeyError) and err.args else err)


def in_flags(message: str, names) -> str:
    """A message about Python parameters in the command line's words, the one place they are translated:
    ``data_root`` -> ``--data-root``, ``beams=0`` -> ``--beams=0``, ``download=True`` -> ``--download``,
    ``strict=False`` -> ``--no-strict``, and a name in backquotes, `` `category` `` -> ``--category``."""
    for name in names:
        flag = name.replace("_", "-")
        message = message.replace(f"`{name}`", f"--{flag}")
        message = re.sub(rf"(?<![\w-]){name}=True\b", f"--{flag}", message)
        message = re.sub(rf"(?<![\w-]){name}=False\b", f"--no-{flag}", message)
        message = re.sub(rf"(?<![\w-]){name}=", f"--{flag}=", message)
        if "_" in name:  # a one-word name is also an English word: left alone
            message = re.sub(rf"(?<![\w-]){name}\b", f"--{flag}", message)
    return message


def _reject_extra(parser: argparse.ArgumentParser, rest: List[str]) -> None:
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")


def _list() -> int:
    for title, group in registry.GROUPS.items():
        plugins = registry.discover(group)
        print(f"{title} ({group}):")
        if not plugins:
            print("  (none installed)")
        for plugin in plugins:
            try:
                summary = _summary_of(plugin.load())
                print(f"  {plugin.name:<14} {plugin.distribution:<22} {summary}")
            except registry.PluginLoadError:
                print(f"  {plugin.name:<14} {plugin.distribution:<22} FAILED TO LOAD: {plugin.error}")
    return 0


def _summary_of(obj) -> str:
    """A plugin's one line: its own summary or docstring (a class's not inherited), else its module's."""
    summary = getattr(obj, "summary", None)
    if isinstance(summary, str):
        return summary
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else inspect.getdoc(obj)
    doc = doc or sys.modules[obj.__module__].__doc__ or ""
    return " ".join(doc.split())[:110].split(". ")[0]


def _info(model_name: str, pretrained: Optional[str]) -> int:
    from e2_core import create_e2
    from e2_core.summary import parameter_summary

    model = create_e2(model_name, pretrained)
    rows, totals = parameter_summary(model)
    width = max(len(name) for name, _ in rows)
    print(f"E2 on {model.clip_model or 'a CLIP'}: entities {list(model.entities)}, "
          f"{model.config.tokens_per_entity} tokens each, fusion after layers {model.visual.fusion_layers}")
    for name, count in rows:
        print(f"  {name:<{width}} {count:>13,}")
    print(f"  {'CLIP total':<{width}} {totals['clip']:>13,}")
    print(f"  {'E2 total':<{width}} {totals['e2']:>13,}")
    print(f"E2 adds {totals['added']:,} parameters = {totals['overhead_percent']:.2f}% of CLIP "
          f"(fusion blocks alone {100 * totals['added_fusion_only'] / totals['clip']:.2f}%; the paper reports 1.9% "
          "for ViT-B/32)")
    return 0


def _run(task_name: Optional[str], argv: List[str]) -> int:
    asked = task_name in ("-h", "--help") or (not task_name and any(a in ("-h", "--help") for a in argv))
    if not task_name or asked:
        tasks = registry.discover(registry.TASK_GROUP)
        print("usage: e2-plugins run TASK [options]   (e2-plugins run TASK --help for its options)\n"
              + "".join(f"  {p.name:<12}{_summary(p)}\n" for p in tasks) if tasks else "no task installed",
              file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    return _execute(registry.get_task(task_name), argv)


def _summary(plugin: registry.Plugin) -> str:
    try:
        return plugin.load().summary
    except registry.PluginLoadError:
        return f"FAILED TO LOAD: {plugin.error}"


def _execute(task: registry.Task, argv: List[str]) -> int:
    options = vars(task_parser(task).parse_args(argv))
    try:
        result = task.run(**options)
    except ERRORS as err:
        raise ValueError(in_flags(_message(err), options)) from err
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _argument_type(parse):
    """``parse`` as an argparse type whose ValueError message reaches the user."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return convert


def task_parser(task: registry.Task) -> argparse.ArgumentParser:
    """An argparse parser built from ``task.run``'s keyword parameters, annotations and docstring."""
    doc = inspect.getdoc(task.run) or ""
    prog = f"e2-plugins {task.name}" if " " in task.name or task.name == "train" else f"e2-plugins run {task.name}"
    parser = argparse.ArgumentParser(prog=prog, description=task.summary)
    helps = _param_docs(doc)
    hints = typing.get_type_hints(task.run)
    for name, param in inspect.signature(task.run).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        flag = "--" + name.replace("_", "-")
        kind, choices = _unwrap(hints.get(name, str))
        kwargs: Dict[str, Any] = {"dest": name, "help": helps.get(name)}
        list_hint = next((h for h in (hints.get(name), *typing.get_args(hints.get(name))) if typing.get_origin(h)
                          in (list, List)), None)
        if list_hint is not None:
            kind, kwargs["nargs"] = typing.get_args(list_hint)[0], "+"
            kind = _argument_type(kind.parse) if hasattr(kind, "parse") else kind
        if param.default is inspect.Parameter.empty:
            kwargs["required"] = True
        else:
            kwargs["default"] = param.default
        choices = list(task.choices[name]()) if name in task.choices else choices
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if choices:
                kwargs["choices"] = choices
        if "default" in kwargs and "(default" not in (kwargs["help"] or ""):  # says what it is when not given
            default = kwargs["default"]
            shown = ("not set" if default is None else f"--{'' if default else 'no-'}{flag[2:]}" if kind is bool
                     else " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default)
            kwargs["help"] = f"{kwargs['help'] or ''} (default: {shown})".lstrip()
        parser.add_argument(flag, **kwargs)
    return parser


def _unwrap(hint: Any):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        return type(args[0]), list(args)
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _unwrap(args[0])
    if hint in (int, float, str, bool, Path):
        return hint, None
    return str, None


def _param_docs(doc: str) -> Dict[str, str]:
    """``name: text`` lines of a Google-style ``Args:`` section."""
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):\s*(.+)$", section, re.M)}


if __name__ == "__main__":
    sys.exit(main())
