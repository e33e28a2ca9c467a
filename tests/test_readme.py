"""The README's code blocks: every ``e2-plugins`` command parses with the command line's own parsers
(task, options, choices, dataset names), every Python block compiles, every script it runs exists.
Commands quoted in the text count too, except synopses and placeholders ([ ], |, ( ), ...)."""
import re
import shlex
from pathlib import Path

import pytest

from e2_core import registry
from e2_plugins.cli import task_parser
from e2_plugins.commands import COMMANDS, DATA_BUILDERS

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", *sorted(ROOT.glob("*/README.md"))]


def blocks(language):
    for readme in READMES:
        for match in re.finditer(rf"^```{language}\n(.*?)^```", readme.read_text(), re.S | re.M):
            yield readme.relative_to(ROOT), match.group(1)


def commands():
    """``(readme, words)`` of each shell command in a bash block, ``&&`` chains split, comments dropped."""
    for readme, block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while "&&" in words:
                yield str(readme), words[:words.index("&&")]
                words = words[words.index("&&") + 1:]
            if words:
                yield str(readme), words


def parse(words):
    """Parse one ``e2-plugins`` command line as ``e2-plugins`` would, without running it."""
    words = [w for w in words if w != "..."]  # the README's "and the options above"
    command, rest = words[0], words[1:]
    if command in ("list", "info"):
        assert len(rest) <= (command == "info")
        return
    task = {"train": lambda: COMMANDS["train"], "run": lambda: registry.get_task(rest.pop(0)),
            "data": lambda: DATA_BUILDERS[rest.pop(0)]}[command]()
    parser = task_parser(task)
    options = vars(parser.parse_args(rest))
    dataset = next((a for a in parser._actions if a.dest == "dataset"), None)
    if dataset is not None and dataset.choices is None:
        registry.get_dataset(options["dataset"])  # an installed reader, as the command line checks it


def inline_commands():
    """Commands quoted in the text (``e2-plugins ...``, ``python benchmarks/...``), synopses with [ ] | ( ) aside."""
    for readme in READMES:
        for span in re.findall(r"`((?:e2-plugins|python) [^`]+)`", readme.read_text()):
            if not re.search(r"[\[\]|()]|\.\.\.", span):
                yield str(readme.relative_to(ROOT)), shlex.split(span)


ALL = list(commands()) + list(inline_commands())
#: tools the README runs in their own environment (they cannot share one with this package)
ELSEWHERE = ("clip-retrieval",)
SCRIPTS = re.findall(r"^([\w-]+) = ", (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1]
                     .split("\n[")[0], re.M)


@pytest.mark.parametrize("readme,words", [c for c in ALL if c[1][0] == "e2-plugins"],
                         ids=lambda value: " ".join(value) if isinstance(value, list) else value)
def test_every_e2_plugins_command_parses(readme, words):
    parse(words[1:])


def test_every_other_command_names_something_that_exists():
    others = [words for _, words in ALL if words[0] != "e2-plugins"]
    assert others, "the README shows how to install and test"
    for words in others:
        if words[0] == "python" and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), words
        elif "torchrun" in words[:words.index("e2_plugins.cli") if "e2_plugins.cli" in words else 0]:
            parse(words[words.index("e2_plugins.cli") + 1:])                   # torchrun, or srun running it
        else:
            assert words[0] in ("pip", "python", *SCRIPTS, *ELSEWHERE), words  # a command this package installs


def test_every_python_block_compiles():
    found = list(blocks("python"))
    assert found
    for readme, block in found:
        compile(block, str(readme), "exec")


def test_every_path_and_name_the_readmes_point_to_exists():
    """Package paths quoted in the READMEs exist, and a name quoted right after a module is defined in it."""
    tops = ("e2_core/", "e2_data/", "e2_train/", "e2_plugins/", "plugins/", "adapters/", "eval/", "benchmarks/", "tests/")
    checked = 0
    for readme in READMES:
        text = readme.read_text()
        for match in re.finditer(r"`([\w./-]+)`((?: `\w+`,?)*)", text):
            path = match.group(1)
            base = ROOT if path.startswith(tops) else readme.parent  # e2_eval/... in eval/README.md
            inside = base != ROOT and path.startswith("e2_") and "/" in path
            if not (path.startswith(tops) or inside) or "<" in path:
                continue
            assert (base / path).exists(), f"{readme.name}: {path}"
            checked += 1
            for name in re.findall(r"`(\w+)`", match.group(2)):
                assert re.search(rf"\b(class|def) {name}\b|^{name} = ", (base / path).read_text(), re.M), \
                    f"{readme.name}: {name} in {path}"
    assert checked > 30
