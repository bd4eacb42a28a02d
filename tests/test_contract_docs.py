"""The package cites its own contract (docs/CONTRACT.md), by sections that exist, never a document users lack."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONTRACT = ROOT / "docs" / "CONTRACT.md"
SEARCHED = ("sveb_kernels", "docs", "tests", "bench", "csrc", "examples", "README.md", "setup.py")
SUFFIXES = {".py", ".md", ".cu", ".cuh", ".h", ".cpp", ".sh", ".toml", ".txt"}
# Spelled in two halves so this file does not match itself.
FOREIGN = re.compile(r"\b" + "SP" + r"EC\b")
SECTION_CITATION = re.compile(r"§(\d[a-c]?)")


def _files():
    for name in SEARCHED:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                        and "__pycache__" not in p.parts)


def test_contract_document_exists_with_every_section():
    text = CONTRACT.read_text()
    for heading in ("## Common rules", "## Packing", "## 1. Hista", "## 2. Numca", "### 2a. NumericVocab",
                    "### 2b. numeric_spans", "### 2c. numca_values", "## 3. GAE", "## 4. Distributed groups",
                    "## 5. Trainer integrations"):
        assert heading in text, heading


def test_no_citation_of_a_document_users_do_not_have():
    offenders = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in _files()
                 for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if FOREIGN.search(line)]
    assert not offenders, "cite docs/CONTRACT.md instead:\n" + "\n".join(offenders)


def test_every_cited_section_exists():
    sections = set(re.findall(r"^#{2,3} (\d[a-c]?)\. ", CONTRACT.read_text(), flags=re.M))
    assert {"1", "2", "2a", "2b", "2c", "3", "4", "5"} <= sections
    cited = {(str(p.relative_to(ROOT)), s) for p in _files()
             for s in SECTION_CITATION.findall(p.read_text(errors="replace"))}
    assert cited, "no section citations found: the search paths are wrong"
    missing = sorted((path, s) for path, s in cited if s not in sections)
    assert not missing, missing


@pytest.mark.parametrize("module", ["sveb_kernels.hista", "sveb_kernels.numca", "sveb_kernels.gae"])
def test_algorithm_docstrings_point_to_the_contract(module):
    import importlib

    assert "docs/CONTRACT.md §" in importlib.import_module(module).__doc__


def test_setup_section_says_what_pip_compiles_and_how_to_skip_it():
    readme = (ROOT / "README.md").read_text()
    setup_section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    assert "SVEB_SKIP_CUDA_BUILD=1" in setup_section and "minutes" in setup_section
    assert "SVEB_SKIP_CUDA_BUILD=1 skips it" in (ROOT / "setup.py").read_text()  # said in the build output too
