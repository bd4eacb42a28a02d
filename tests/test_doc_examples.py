"""Every Python example of README.md and docs/ runs as written, found in the docs at test time.

The blocks of one page run in order in one namespace, as a reader would paste them (docs/SVEB.md's
second block calls the function its first defines). A block that leaves names to the reader (the
TRL example's `model`, `tokenizer`, ...) gets tiny local stand-ins from `GIVEN`; a name no stand-in
provides fails the test, so a new example cannot slip through unrun. A block with
`if __name__ == "__main__":` (it starts processes) runs as a script in its own process. Two README
examples are run by the tests that pin them (`RUN_ELSEWHERE`). The verl config lines are checked
against the plugin by `test_readme_verl_options_are_accepted`.
"""

import ast
import builtins
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "results" / "README.md", *(ROOT / "docs").glob("*.md")])

# (page, section heading) -> the test that runs that section's first Python block.
RUN_ELSEWHERE = {
    ("README.md", "Use inside a trainer step"): ("tests/test_readme.py", "test_trainer_step_example_runs"),
    ("README.md", "Multi-GPU use"): ("tests/test_distributed.py", "test_readme_multi_gpu_example_runs"),
}


def _python_blocks(doc: pathlib.Path):
    """(line, section heading, code) of each ```python block."""
    text = doc.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
        before = text[:match.start()]
        headings = re.findall(r"^#{1,6} (.+)$", before, re.M)
        blocks.append((before.count("\n") + 1, headings[-1].strip() if headings else "", match.group(1)))
    return blocks


def _free_names(code: str) -> set[str]:
    """Names a block reads but never binds (nor Python does)."""
    tree = ast.parse(code)
    loaded, bound = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    return loaded - bound - set(dir(builtins))


# ------------------------------------------------------------------ stand-ins for what the reader has
def _trl_setup(tmp_path):
    """A tiny random Llama, its local tokenizer, four prompts, a reward and a one-step GRPOConfig."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig

    from sveb_kernels.sveb import tiny

    tokenizer = tiny.build_tokenizer()

    def reward(completions, **kwargs):
        return [float(c.count("3")) for c in completions]

    grpo_config = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                             max_completion_length=8, max_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, logging_steps=1)
    return {"model": tiny.build_model(tokenizer, seed=0), "tokenizer": tokenizer, "reward": reward,
            "grpo_config": grpo_config,
            "dataset": Dataset.from_dict({"prompt": ["Compute: 3 + 4", "Compute: 12 + 7"] * 2})}


GIVEN = {frozenset({"model", "tokenizer", "reward", "grpo_config", "dataset"}): _trl_setup}


def _given(names: set[str], where: str, tmp_path) -> dict:
    for provided, build in GIVEN.items():
        if names <= provided:
            return build(tmp_path)
    raise AssertionError(f"{where} uses {sorted(names)}, which no stand-in in tests/test_doc_examples.py provides: "
                         "define them in the example, or add a stand-in to GIVEN")


# ------------------------------------------------------------------ the tests
def test_examples_run_elsewhere_are_run_there():
    for (page, heading), (test_file, test_name) in RUN_ELSEWHERE.items():
        assert any(h == heading for _, h, _ in _python_blocks(ROOT / page)), (page, heading)
        assert f"def {test_name}(" in (ROOT / test_file).read_text(), (test_file, test_name)


# docs/SVEB.md's "From Python" builds and scores the embedded task: ~45 s of CPU.
@pytest.mark.parametrize("doc", [pytest.param(d, marks=[pytest.mark.slow] if d.name == "SVEB.md" else [])
                                 for d in DOCS if _python_blocks(d)], ids=lambda d: str(d.relative_to(ROOT)))
def test_python_examples_run(doc, tmp_path, monkeypatch):
    page = str(doc.relative_to(ROOT))
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    namespace: dict = {"__name__": "__doc_example__"}
    ran, sections = 0, set()
    for line, heading, code in _python_blocks(doc):
        where = f"{page}:{line} ({heading})"
        first_in_section = heading not in sections
        sections.add(heading)
        if first_in_section and (page, heading) in RUN_ELSEWHERE:
            continue
        if re.search(r"^if __name__ == .__main__.:", code, re.M):
            script = tmp_path / f"example_{line}.py"
            script.write_text(code)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                       OMP_NUM_THREADS="1")
            done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"{where}\n{done.stderr[-3000:]}"
        else:
            missing = _free_names(code) - set(namespace)
            if missing:
                namespace.update(_given(missing, where, tmp_path))
            first = code.lstrip().splitlines()[0]
            if re.fullmatch(r"# *[\w.]+\.py", first):  # "# my_module.py": the reader saves it under that name
                (tmp_path / first.lstrip("# ").strip()).write_text(code)
            try:
                exec(compile(code, where, "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{where} fails: {type(e).__name__}: {e}") from e
        ran += 1
    assert ran or all((page, h) in RUN_ELSEWHERE for _, h, _ in _python_blocks(doc)), page


def test_readme_verl_config_is_accepted():
    """The README's verl lines, parsed as Hydra would (interpolations included), go through verl's own
    `compute_advantage` as the plugin wraps it; a misspelt key would be a ValueError there."""
    pytest.importorskip("verl")
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo import core_algos, ray_trainer

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use with verl", 1)[1].split("\n## ", 1)[0]
    lines = "\n".join(re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M))
    estimators = set(re.findall(r"algorithm\.adv_estimator=(\w+)", lines))
    assert estimators == {"sveb_gae", "sveb_numca", "sveb_hista"}, estimators
    for name in estimators:
        core_algos.get_adv_estimator_fn(name)  # registered (it explains itself when called directly)
    option_lines = re.findall(r"\+algorithm\.(sveb\.[\w.]+)=(\S+?)'?(?=\s|$)", lines)
    options = [f"algorithm.{key}={value}" for key, value in option_lines]
    assert len(options) >= 6, options
    root = OmegaConf.from_dotlist(options + ["actor_rollout_ref.model.path=/the/actor"])
    assert root.algorithm.sveb.tokenizer == "/the/actor"

    batch, length = 4, 9
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length)
    mask[1, 6:] = 0

    def data():
        return DataProto.from_dict(
            tensors={"token_level_rewards": torch.rand(batch, length, generator=generator) * mask,
                     "values": torch.rand(batch, length, generator=generator) * mask, "response_mask": mask},
            non_tensors={"uid": np.array(["a", "a", "b", "b"], dtype=object)})

    out = ray_trainer.compute_advantage(data(), adv_estimator="sveb_gae", gamma=1.0, lam=0.95, config=root.algorithm)
    assert torch.isfinite(out.batch["advantages"]).all()
    misspelt = OmegaConf.from_dotlist(["algorithm.sveb.numca.matchh=prefix"])
    with pytest.raises(ValueError, match="matchh"):
        ray_trainer.compute_advantage(data(), adv_estimator="sveb_gae", config=misspelt.algorithm)
