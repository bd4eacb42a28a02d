"""The docs match the code: every name, module, file, link and command that README.md and docs/ mention
exists and is accepted, read from the docs at test time (a name added to a doc later is checked too).
The examples themselves run in tests/test_doc_examples.py."""

import importlib
import pathlib
import re
import shlex
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What a user reads: the README, every page under docs/, the README beside the results.
DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "results" / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```[^\n]*\n.*?^```", re.S | re.M)
INLINE_CODE = re.compile(r"`([^`\n]+)`")


def _doc_ids():
    return [str(p.relative_to(ROOT)) for p in DOCS]


def _prose(text: str) -> str:
    """The text without its fenced blocks (so a fence's backticks do not pair with inline code)."""
    return FENCE.sub("", text)


def _resolve(dotted: str):
    """Imports the longest module prefix of `dotted`, then looks up the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:cut]).startswith(e.name):
                raise  # the module exists but one of its own imports is missing: a real failure
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


# --------------------------------------------------------------------------- one Python version
def test_python_version_is_one_truth():
    """pyproject's requires-python, the README's "Python X.Y+" and the interpreter the tests run on."""
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", floor)
    assert match, f"requires-python {floor!r}: expected '>=X.Y'"
    version = (int(match[1]), int(match[2]))
    stated = re.findall(r"Python (\d+)\.(\d+)\+", (ROOT / "README.md").read_text())
    assert stated and {tuple(map(int, s)) for s in stated} == {version}, (stated, floor)
    assert sys.version_info[:2] >= version


# --------------------------------------------------------------------------- names and modules
def _dotted_package_names(text: str) -> set[str]:
    # `sveb_kernels.x.y` anywhere (prose or code); the compiled extension is optional and not a public name.
    return {name for name in re.findall(r"\bsveb_kernels(?:\.\w+)+", text) if not name.startswith("sveb_kernels._C")}


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids())
def test_every_sveb_kernels_name_the_docs_mention_exists(doc):
    names = _dotted_package_names(doc.read_text())
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name}: {type(e).__name__}: {e}")
    assert not missing, f"{doc.name} names what the package lacks:\n" + "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids())
def test_every_op_the_docs_mention_is_registered(doc):
    import torch

    import sveb_kernels  # noqa: F401  (registers the ops)

    ops = set(re.findall(r"\btorch\.ops\.sveb\.(\w+)", doc.read_text()))
    missing = sorted(op for op in ops if not hasattr(torch.ops.sveb, op))
    assert not missing, missing


# Calls whose first name belongs to another library: checked by that library, not here.
FOREIGN_ROOTS = {"torch", "verl", "trl", "transformers", "numpy", "np", "dist", "os", "datasets", "tokenizers"}


@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "docs" / "CONTRACT.md"], ids=["README.md", "CONTRACT.md"])
def test_every_public_call_in_readme_and_contract_exists(doc):
    """Each `name(...)` / `Name.method(...)` written as inline code resolves in the package's public
    namespace, in `sveb_kernels.distributed`, or in a `sveb_kernels` module the same page names (by
    its last part: `toy_tokenizers.build` with `sveb_kernels.numca.toy_tokenizers`), `sk`/`skd` being
    the README's aliases."""
    import sveb_kernels

    text = doc.read_text()
    spaces = {"": sveb_kernels, "sk": sveb_kernels, "skd": importlib.import_module("sveb_kernels.distributed")}
    for name in _dotted_package_names(text):
        try:
            spaces.setdefault(name.rsplit(".", 1)[1], importlib.import_module(name))
        except ImportError:
            pass  # an attribute, not a module: checked by the test above
    calls = {m[1] for code in INLINE_CODE.findall(_prose(text)) if (m := re.match(r"([A-Za-z_][\w.]*)\(", code))}
    assert calls, "no calls found: the pattern is wrong"
    missing = []
    for call in sorted(calls):
        first, *rest = call.split(".")
        if first in FOREIGN_ROOTS or first == "sveb_kernels":
            continue  # sveb_kernels.* is resolved above
        candidates = [(spaces[""], [first, *rest])] + ([(spaces[first], rest)] if first in spaces else [])
        candidates += [(spaces[alias], [first, *rest]) for alias in ("skd",)]
        if not any(_has_path(space, path) for space, path in candidates):
            missing.append(call)
    assert not missing, f"{doc.name} calls what the package lacks: {missing}"


def _has_path(obj, path) -> bool:
    for attr in path:
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


# --------------------------------------------------------------------------- files and links
# Files a build or a documented script writes and git ignores, so a clean clone may lack them: the
# extension's build record (absent where no extension is built, e.g. SVEB_SKIP_EXTENSION=1) and the
# RL experiment's warm-start weights (rebuilt deterministically).
GENERATED_FILES = {"sveb_kernels/_C_build.json", "bench/results/rl_credit/warm.pt",
                   "bench/results/rl_credit_progress/warm.pt"}
PATH = re.compile(r"(?<![\w/.-])((?:sveb_kernels|docs|bench|examples|tests|csrc|\.ci)/[\w./{},*-]*)")


def _expand(path: str) -> list[str]:
    """`a.{png,csv}` -> `a.png`, `a.csv` (the docs' shorthand for a set of files)."""
    brace = re.search(r"\{([^{}]*)\}", path)
    if not brace:
        return [path]
    head, tail = path[:brace.start()], path[brace.end():]
    return [p for option in brace[1].split(",") for p in _expand(head + option.strip() + tail)]


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids())
def test_every_repository_path_the_docs_name_exists(doc):
    """Paths like `sveb_kernels/benchmark/runner.py`, `bench/gpu_suite.sh`, `docs/CONTRACT.md`."""
    found = set()
    for raw in PATH.findall(doc.read_text()):
        raw = raw.rstrip(".,")
        found.update(_expand(raw))
    missing = sorted(p for p in found if p not in GENERATED_FILES
                     and not (any(ROOT.glob(p)) if "*" in p else (ROOT / p).exists()))
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids())
def test_every_relative_link_resolves(doc):
    text = INLINE_CODE.sub("", _prose(doc.read_text()))  # `kernel[grid](...)` is code, not a link
    links = re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    targets = {(doc.parent / link).resolve() for link in links if "://" not in link}
    missing = sorted(str(t.relative_to(ROOT)) for t in targets
                     if not t.exists() and str(t.relative_to(ROOT)) not in GENERATED_FILES)
    assert not missing, f"{doc.name} links to missing files: {missing}"


# --------------------------------------------------------------------------- commands
def _command_lines(text: str) -> list[str]:
    """Shell commands of the docs: lines of fenced blocks (continuations joined, comments cut) and
    inline code, each cut at the first `&&`, `|`, `;` or `&`."""
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        lines += block.replace("\\\n", " ").splitlines()
    lines += INLINE_CODE.findall(_prose(text))
    commands = []
    for line in lines:
        for part in re.split(r"&&|\|\||[|;]|&(?!\w)", line):
            part = re.sub(r"(^|\s)#.*", "", part).strip()
            if part:
                commands.append(part)
    return commands


def _argv(command: str) -> list[str]:
    # `[--flag]` is the docs' optional argument; `...` an elision.
    words = shlex.split(re.sub(r"\[(--[^\]]*)\]", r"\1", command))
    return [w for w in words if w != "..."]


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids())
def test_every_sveb_kernels_command_parses(doc):
    """Each `sveb-kernels ...` command the docs show is accepted by the command's own parser."""
    from sveb_kernels import cli

    commands = [c for c in _command_lines(doc.read_text()) if c.startswith("sveb-kernels ")]
    bad = []
    for command in commands:
        argv = _argv(command)[1:]
        if not argv or argv[-1] == "--help":
            continue
        try:
            cli.build_parser(argv).parse_args(argv)
        except SystemExit:
            bad.append(command)
    assert not bad, f"{doc.name}: the command refuses {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=_doc_ids())
def test_every_script_the_docs_run_exists_with_its_options(doc):
    """`python examples/x.py --flag ...` and `bash bench/y.sh`: the script exists and defines each flag."""
    bad = []
    for command in _command_lines(doc.read_text()):
        words = _argv(command) if re.match(r"(python3?|bash|sh) ", command) else []
        if len(words) < 2 or not re.match(r"(examples|bench|tests)/", words[1]):
            continue
        script = ROOT / words[1]
        if not script.is_file():
            bad.append(f"{command}: no {words[1]}")
            continue
        source = script.read_text()
        bad += [f"{command}: {w} not in {words[1]}" for w in words[2:]
                if w.startswith("--") and f'"{w.split("=")[0]}"' not in source]
    assert not bad, "\n".join(bad)
