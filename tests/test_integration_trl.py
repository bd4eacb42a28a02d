"""SvebGRPOTrainer end to end with the real trl (1.16.x): a tiny random Llama and a tokenizer built
locally (no hub access), >= 2 training steps per estimator. The expected advantages are computed
here from the ops directly on the same completions (and, for Hista, from `output_hidden_states`
rather than the trainer's forward hook)."""

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from sveb_kernels import NumericVocab, hista_values, numca_values, numeric_spans
from sveb_kernels.packing import Packing
from sveb_kernels.sveb import tiny

datasets = pytest.importorskip("datasets")  # a dependency of trl: present whenever trl is
import trl  # noqa: E402  (the [trl] extra is part of the test extra: no skip when it is missing)
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from sveb_kernels.integrations.trl import SvebGRPOTrainer, resolve_layer  # noqa: E402

GENERATIONS = 4
LENGTH = 10
PROMPTS = ["Compute: 3 + 4", "Compute: 12 + 7", "Compute: 5 - 2", "Compute: 9 + 9"]
# prompts of different token lengths: TRL left-pads them, so a padding bug in the state positions shows
VARIED_PROMPTS = ["3 + 4", "Compute the sum: 12 + 7 + 1", "Compute: 5 - 2", "Please compute this: 9 + 9 + 9 + 9 = ?"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def reward(completions, **kwargs):
    return [float(c.count("3")) + 0.5 * c.count("+") for c in completions]


def config(tmp_path, tokenizer, seed, **overrides):
    # Completions from a few digit and operator tokens only: short numbers that peers share.
    vocab = tokenizer.get_vocab()
    allowed = {vocab[t] for t in ["1", "2", "3", "Ġ", "Ġ+", "Ġ="]}
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2 * GENERATIONS,
                   num_generations=GENERATIONS, max_completion_length=LENGTH, max_steps=2, learning_rate=1e-2,
                   logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=seed % 2**31,
                   scale_rewards="none", dataloader_num_workers=0,
                   generation_kwargs={"suppress_tokens": sorted(set(range(len(tokenizer))) - allowed)})
    options.update(overrides)
    return GRPOConfig(**options)


def recording(base):
    """A trainer class that keeps what generation produced and what the loss received."""

    class Recording(base):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
            attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
            with torch.no_grad():  # the policy as it generated, read independently of the trainer's hook
                hidden = self.model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
            self.generated.append({k: out[k].clone() for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                                                               "advantages")} | {"hidden": hidden})
            return out

        def _compute_loss(self, model, inputs):
            self.losses.append({k: inputs[k].clone() for k in ("completion_ids", "advantages")})
            return super()._compute_loss(model, inputs)

    return Recording


def train(base, tmp_path, tokenizer, seed, args=None, prompts=PROMPTS, **kwargs):
    cls = recording(base)
    cls.generated, cls.losses = [], []
    model = tiny.build_model(tokenizer, seed=seed % 1000)
    trainer = cls(model=model, reward_funcs=reward, args=args or config(tmp_path, tokenizer, seed),
                  train_dataset=datasets.Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer, **kwargs)
    trainer.train()
    assert trainer.state.global_step == 2
    return trainer


def direct_returns(tokenizer, completion_ids, completion_mask):
    texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(completion_ids, completion_mask)]
    return torch.tensor(reward(texts), dtype=torch.float32)


def check_loss_saw_generated(trainer):
    """Every row the loss used is a generated row with the same [B, T] advantages (TRL shuffles rows)."""
    rows = {}
    for gen in trainer.generated:
        for ids, adv in zip(gen["completion_ids"], gen["advantages"]):
            rows.setdefault(tuple(ids.tolist()), []).append(adv)
    assert trainer.losses
    for loss in trainer.losses:
        adv = loss["advantages"]
        assert adv.dim() == 2 and adv.shape == loss["completion_ids"].shape
        for ids, a in zip(loss["completion_ids"], adv):
            assert any(torch.equal(a, b) for b in rows[tuple(ids.tolist())])


def varies_within_a_rollout(advantages, mask):
    spread = [(a[m.bool()].max() - a[m.bool()].min()).item() for a, m in zip(advantages, mask) if m.sum() > 1]
    return max(spread) > 1e-3


def test_numca_advantages_are_r_minus_v_per_token(tmp_path, tokenizer, seed):
    trainer = train(SvebGRPOTrainer, tmp_path, tokenizer, seed, value_estimator="numca",
                    args=config(tmp_path, tokenizer, seed, log_completions=True))
    vocab = NumericVocab.from_tokenizer(tokenizer)
    varied = False
    for gen in trainer.generated:
        ids, mask, adv = gen["completion_ids"], gen["completion_mask"].bool(), gen["advantages"]
        assert adv.shape == ids.shape and adv.dtype == torch.float32
        returns = direct_returns(tokenizer, ids, mask)
        group = torch.arange(ids.shape[0]) // GENERATIONS
        after = numca_values(numeric_spans(ids, vocab, mask=mask), returns, group, mask, match="last",
                             backend="reference")
        peers = torch.stack([(returns[group == group[b]].sum() - returns[b]) / (GENERATIONS - 1)
                             for b in range(ids.shape[0])])
        before = torch.cat([peers[:, None], after[:, :-1]], dim=1)  # V(s_t): the state before token t
        want = (returns[:, None] - before) * mask
        assert torch.allclose(adv, want, atol=1e-5)
        varied |= varies_within_a_rollout(adv, mask)
    assert varied
    check_loss_saw_generated(trainer)
    logs = trainer.state.log_history[0]
    assert logs["sveb/advantage/within_completion_std"] >= 0 and "sveb/value/mean" in logs
    # the completions table: TRL's advantage column is each completion's mean token advantage,
    # the token-level numbers are extra columns
    import pandas

    table = pandas.read_parquet(tmp_path / "out" / "completions" / "completions_00002.parquet")
    gen = trainer.generated[-1]
    mask = gen["completion_mask"].bool()
    mean = (gen["advantages"] * mask).sum(1) / mask.sum(1).clamp_min(1)
    assert table["advantage"].tolist() == pytest.approx(mean.tolist(), abs=1e-5)
    first = [float(x) for x in table["sveb_token_advantages"][0].split()]
    assert first == pytest.approx(gen["advantages"][0][mask[0]].tolist(), rel=1e-2, abs=1e-2)



def test_unscorable_completions_get_zero_advantage(tmp_path, tokenizer, seed):
    def picky(completions, **kwargs):  # None: this completion cannot be scored
        return [None if c.count("1") >= 2 else float(c.count("3")) for c in completions]

    cls = recording(SvebGRPOTrainer)
    cls.generated, cls.losses = [], []
    trainer = cls(model=tiny.build_model(tokenizer, seed=seed % 1000), reward_funcs=picky,
                  args=config(tmp_path, tokenizer, seed), processing_class=tokenizer, value_estimator="numca",
                  train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))
    trainer.train()
    vocab = NumericVocab.from_tokenizer(tokenizer)
    seen = []
    for gen in trainer.generated:
        ids, mask, adv = gen["completion_ids"], gen["completion_mask"].bool(), gen["advantages"]
        texts = [tokenizer.decode(i[m], skip_special_tokens=True) for i, m in zip(ids, mask)]
        raw = torch.tensor([float("nan") if r is None else r for r in picky(texts)])
        group = torch.arange(ids.shape[0]) // GENERATIONS
        fill = torch.stack([torch.nan_to_num(raw[group == g].nanmean(), nan=0.0) for g in group])
        returns = torch.where(raw.isnan(), fill, raw)  # unscorable ones stand at their group's mean
        after = numca_values(numeric_spans(ids, vocab, mask=mask), returns, group, mask, backend="reference")
        peers = torch.stack([(returns[group == group[b]].sum() - returns[b]) / (GENERATIONS - 1)
                             for b in range(ids.shape[0])])
        want = (returns[:, None] - torch.cat([peers[:, None], after[:, :-1]], dim=1)) * mask
        want[raw.isnan()] = 0.0
        assert torch.allclose(adv, want, atol=1e-5)
        assert torch.isfinite(adv).all()
        seen += raw.isnan().tolist()
    assert any(seen) and not all(seen)  # both kinds occurred


@pytest.mark.parametrize("num_iterations", [1, 2])  # 2: TRL runs a no-grad forward the hook reads
def test_hista_advantages_use_the_state_before_each_token(tmp_path, tokenizer, seed, num_iterations, monkeypatch):
    extra_forwards = []
    original = SvebGRPOTrainer._hidden_by_forward
    monkeypatch.setattr(SvebGRPOTrainer, "_hidden_by_forward",
                        lambda self, *a: extra_forwards.append(1) or original(self, *a))
    trainer = train(SvebGRPOTrainer, tmp_path, tokenizer, seed, args=config(
        tmp_path, tokenizer, seed, num_iterations=num_iterations), value_estimator="hista", hista_temperature=0.05,
        prompts=VARIED_PROMPTS)
    assert len(extra_forwards) == (len(trainer.generated) if num_iterations == 1 else 0)
    varied = False
    for gen in trainer.generated:
        ids, mask, adv = gen["completion_ids"], gen["completion_mask"].bool(), gen["advantages"]
        returns = direct_returns(tokenizer, ids, mask)
        group = torch.arange(ids.shape[0]) // GENERATIONS
        prompt_length = gen["prompt_ids"].shape[1]
        assert gen["prompt_mask"].sum(1).unique().numel() > 1  # left-padded prompts of different lengths
        states = gen["hidden"][-1][:, prompt_length - 1:prompt_length - 1 + ids.shape[1]]  # before token t
        packing = Packing.from_padded(mask, group)
        out = hista_values(packing.pack(states), returns[packing.rollout_ids.long()], packing.rollout_ids,
                           packing.group_offsets, temperature=0.05, backend="reference")
        want = (returns[:, None] - packing.unpack(out.values)) * mask
        assert adv.shape == ids.shape
        assert torch.allclose(adv, want, atol=1e-4)
        varied |= varies_within_a_rollout(adv, mask)
    assert varied
    check_loss_saw_generated(trainer)


def test_callable_estimator_with_gae(tmp_path, tokenizer, seed):
    def ramp(batch):  # any fn(batch) -> [B, T]; here a value that grows along the completion
        return 0.1 * torch.arange(batch.shape[1], dtype=torch.float32).expand(batch.shape) + batch.returns[:, None] * 0.5

    trainer = train(SvebGRPOTrainer, tmp_path, tokenizer, seed, value_estimator=ramp, advantage_mode="gae",
                    gamma=0.9, lam=0.8)
    for gen in trainer.generated:
        ids, mask, adv = gen["completion_ids"], gen["completion_mask"].bool(), gen["advantages"]
        returns = direct_returns(tokenizer, ids, mask).tolist()
        for b in range(ids.shape[0]):  # the GAE recurrence as a plain loop
            n = int(mask[b].sum())
            peers = returns[b - b % GENERATIONS:b - b % GENERATIONS + GENERATIONS]
            if max(peers) == min(peers):  # an all-equal group: no signal, as in GRPO
                assert (adv[b] == 0).all()
                continue
            # scale_rewards="none": returns and values centred on the group mean (GRPO's baseline)
            center = sum(peers) / GENERATIONS
            v = [0.1 * t + 0.5 * returns[b] - center for t in range(n)]
            last, want = 0.0, [0.0] * n
            for t in reversed(range(n)):
                nextv = v[t + 1] if t + 1 < n else 0.0
                delta = (returns[b] - center if t == n - 1 else 0.0) + 0.9 * nextv - v[t]
                last = delta + 0.9 * 0.8 * last
                want[t] = last
            assert torch.allclose(adv[b, :n], torch.tensor(want), atol=1e-4)
            assert (adv[b, n:] == 0).all()
        assert varies_within_a_rollout(adv, mask)
    check_loss_saw_generated(trainer)


def test_group_mean_estimator_is_plain_grpo(tmp_path, tokenizer, seed):
    args = config(tmp_path, tokenizer, seed, scale_rewards="group")
    plain = train(GRPOTrainer, tmp_path, tokenizer, seed, args=args)
    ours = train(SvebGRPOTrainer, tmp_path, tokenizer, seed, args=args, value_estimator="group_mean")
    for a, b in zip(plain.generated, ours.generated):
        assert torch.equal(a["completion_ids"], b["completion_ids"])
        mask = b["completion_mask"].bool()
        assert b["advantages"].shape == mask.shape
        assert torch.allclose(b["advantages"], a["advantages"][:, None] * mask, atol=1e-5)
        assert not varies_within_a_rollout(b["advantages"], mask)
    for p, q in zip(plain.model.parameters(), ours.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)
    for x, y in zip(plain.state.log_history[:2], ours.state.log_history[:2]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["reward"] == y["reward"]


def test_hook_layer_matches_hidden_states(tokenizer):
    model = tiny.build_model(tokenizer, seed=3)
    ids = torch.tensor([tokenizer("Compute: 12 + 7 = 19")["input_ids"]])
    with torch.no_grad():
        want = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 1, 2, -1, -2, -3):
        store = []
        handle = resolve_layer(model, layer).hook(store.append)
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
        assert torch.allclose(store[0], want[layer], atol=1e-6)
    with pytest.raises(ValueError, match="hidden_layer"):
        resolve_layer(model, 3)


def test_bad_options(tmp_path, tokenizer, seed):
    model = tiny.build_model(tokenizer, seed=0)
    common = dict(model=model, reward_funcs=reward, args=config(tmp_path, tokenizer, seed),
                  train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer)
    with pytest.raises(ValueError, match="advantage_mode"):
        SvebGRPOTrainer(**common, advantage_mode="td")
    with pytest.raises(ValueError, match="gamma"):
        SvebGRPOTrainer(**common, advantage_mode="gae", gamma=1.5)
    with pytest.raises(ValueError, match="unknown estimator"):
        SvebGRPOTrainer(**common, value_estimator="critic_v9")
    with pytest.raises(ValueError, match="hidden_layer"):
        SvebGRPOTrainer(**common, value_estimator="hista", hidden_layer=7)
    with pytest.raises(ValueError, match="match"):
        SvebGRPOTrainer(**common, numca_match="first")
    assert trl.__version__.startswith("1.16.")


def test_importing_the_package_imports_no_trainer():
    code = ("import sys, sveb_kernels, sveb_kernels.estimators, sveb_kernels.integrations, sveb_kernels.sveb; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('trl', 'verl', 'transformers')], sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_groups_spanning_processes(tmp_path):
    """2 gloo processes x 6 completions, groups of 4: the middle group spans both processes. Numca and
    Hista value each process's rows through sveb_kernels.distributed; callables get the gathered
    whole batch. Every process must end with the advantages of the whole batch, identically."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = os.path.join(os.path.dirname(__file__), "trl_worker.py")
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, worker, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    tokenizer = tiny.build_tokenizer()
    vocab = NumericVocab.from_tokenizer(tokenizer)
    group = torch.arange(12) // 4
    for name in ranks[0]["results"]:
        for a, b in zip(ranks[0]["results"][name], ranks[1]["results"][name]):
            assert torch.equal(a["all_advantages"], b["all_advantages"])
            assert torch.equal(a["all_token_ids"], b["all_token_ids"])
            everything = a["all_advantages"]
            assert everything.shape[0] == 12
            for rank, rec in enumerate((a, b)):  # each process keeps its rows of the whole batch
                rows, width = rec["advantages"].shape
                assert torch.equal(rec["advantages"], everything[rank * rows:(rank + 1) * rows, :width])
                assert torch.equal(rec["completion_ids"], a["all_token_ids"][rank * rows:(rank + 1) * rows, 1:width + 1])
            ids, mask = a["all_token_ids"][:, 1:], a["all_token_mask"]
            returns = direct_returns(tokenizer, ids, mask)
            assert torch.allclose(returns, a["all_returns"])
            peers = torch.stack([(returns[group == group[r]].sum() - returns[r]) / 3 for r in range(12)])
            if name == "numca":  # the whole batch against the ops called directly
                after = numca_values(numeric_spans(ids, vocab, mask=mask), returns, group, mask, backend="reference")
                want = (returns[:, None] - torch.cat([peers[:, None], after[:, :-1]], dim=1)) * mask
                assert torch.allclose(everything, want, atol=1e-5)
            if name == "rloo_whole":
                assert torch.allclose(everything, (returns - peers)[:, None] * mask, atol=1e-5)
    # sharded Hista (distributed op, no gathered hidden states) == Hista on the gathered whole batch,
    # on the first generation (after a step, float rounding in the two updates makes the models differ)
    a, b = ranks[0]["results"]["hista"][0], ranks[0]["results"]["hista_whole"][0]
    assert torch.equal(a["all_token_ids"], b["all_token_ids"])
    assert torch.allclose(a["all_advantages"], b["all_advantages"], atol=1e-5)
    assert varies_within_a_rollout(a["all_advantages"], a["all_token_mask"])


def test_numca_example_runs(tmp_path, monkeypatch, capsys):
    examples = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
    monkeypatch.syspath_prepend(examples)
    import trl_grpo_hista  # noqa: F401  (imports the shared runner; must not start anything)
    import trl_grpo_numca

    trainer = trl_grpo_numca.run("numca", steps=2, pretrain_steps=0, output_dir=str(tmp_path / "out"))
    assert trainer.state.global_step == 2
    assert "token values and advantages" in capsys.readouterr().out


def constant(completions, **kwargs):
    return [2.0 for _ in completions]


@pytest.mark.parametrize("estimator", ["numca", "hista", "group_mean", "rloo", "callable"])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_constant_rewards_give_no_signal(tmp_path, tokenizer, seed, estimator, scale_rewards):
    """Every reward equal (GRPO's advantage 0): GAE with gamma < 1 over any values must give 0,
    not the drift (gamma - 1) V divided by the zero std (+1e-4): max |A| was 1e3-6e3."""
    def ramp(batch):  # values unrelated to the reward level
        return 0.3 * torch.arange(batch.shape[1], dtype=torch.float32).expand(batch.shape)

    cls = recording(SvebGRPOTrainer)
    cls.generated, cls.losses = [], []
    trainer = cls(model=tiny.build_model(tokenizer, seed=seed % 1000), reward_funcs=constant,
                  args=config(tmp_path, tokenizer, seed, max_steps=1, scale_rewards=scale_rewards),
                  train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                  value_estimator=ramp if estimator == "callable" else estimator, advantage_mode="gae", gamma=0.9,
                  lam=0.95)
    trainer.train()
    assert trainer.generated
    for gen in trainer.generated:
        assert torch.equal(gen["advantages"], torch.zeros_like(gen["advantages"]))
    assert trainer.state.log_history[0]["loss"] == pytest.approx(0.0, abs=1e-6)


def test_eval_with_one_generation_gives_no_signal(tmp_path, tokenizer, seed):
    """num_generations_eval=1: TRL's GRPO advantage is R - R = 0; R was divided by 1e-4."""
    trainer = SvebGRPOTrainer(model=tiny.build_model(tokenizer, seed=seed % 1000), reward_funcs=reward,
                              args=config(tmp_path, tokenizer, seed, num_generations_eval=1,
                                          per_device_eval_batch_size=4, scale_rewards="group"),
                              train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                              eval_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                              processing_class=tokenizer, value_estimator="numca", advantage_mode="gae", gamma=0.99)
    trainer.evaluate()
    last = trainer.sveb_last
    assert last.advantages.shape[0] == len(PROMPTS)
    assert torch.equal(last.advantages, torch.zeros_like(last.advantages))
    assert bool((last.rewards > 0).any())  # the rewards were not all 0: the rule, not the data, gave 0


@pytest.mark.parametrize("num_iterations", [1, 2])  # 1: the fallback forward; 2: TRL's own forward
def test_hook_keeps_only_the_states_it_needs(tmp_path, tokenizer, seed, num_iterations, monkeypatch):
    """The hook copies out the states before the real completion tokens only; it used to keep a
    view of the layer's whole output ([rows, P + C, D]) alive until the values were computed."""
    from sveb_kernels.integrations import trl as integration

    held, whole, needed = [], [], []
    original = integration._StateCapture.__call__

    def spy(self, hidden):
        original(self, hidden)
        whole.append(hidden.untyped_storage().nbytes())
        held.append(self.rows[-1].untyped_storage().nbytes())
        chunk = self.mask[self.offset - hidden.shape[0]:self.offset]
        needed.append(int(chunk.sum()) * hidden.shape[-1] * hidden.element_size())

    monkeypatch.setattr(integration._StateCapture, "__call__", spy)
    trainer = train(SvebGRPOTrainer, tmp_path, tokenizer, seed, value_estimator="hista", args=config(
        tmp_path, tokenizer, seed, num_iterations=num_iterations), prompts=VARIED_PROMPTS)
    assert held and held == needed
    assert sum(held) < sum(whole)
    print(f"hook bytes held: {sum(held)} (was {sum(whole)}) over {len(trainer.generated)} generation batches")


def test_tool_tokens_are_no_states_no_milestones(tmp_path, tokenizer, seed, monkeypatch):
    """TRL's tool_mask (0 = tool output): those tokens are no Numca milestone, no Hista query or key,
    and get advantage 0; verl's response mask excludes them the same way."""
    generate = GRPOTrainer._generate_and_score_completions

    def with_tool_output(self, inputs):  # completion tokens 2..4 play a tool's output
        out = generate(self, inputs)
        tool = torch.ones_like(out["completion_mask"])
        tool[:, 2:5] = 0
        out["tool_mask"] = tool
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", with_tool_output)
    trainer = train(SvebGRPOTrainer, tmp_path, tokenizer, seed, value_estimator="numca")
    vocab = NumericVocab.from_tokenizer(tokenizer)
    for gen in trainer.generated:
        ids, adv = gen["completion_ids"], gen["advantages"]
        real = gen["completion_mask"].bool()
        mask = real.clone()
        mask[:, 2:5] = False
        assert (adv[:, 2:5] == 0).all()
        returns = direct_returns(tokenizer, ids, real)
        group = torch.arange(ids.shape[0]) // GENERATIONS
        after = numca_values(numeric_spans(ids, vocab, mask=mask), returns, group, mask, backend="reference")
        peers = torch.stack([(returns[group == group[b]].sum() - returns[b]) / (GENERATIONS - 1)
                             for b in range(ids.shape[0])])
        spread = torch.stack([returns[group == group[b]].max() > returns[group == group[b]].min()
                              for b in range(ids.shape[0])])
        # the value before token t: the last milestone among the model's own tokens before t
        before = torch.cat([peers[:, None], after[:, :-1]], dim=1)
        for b in range(ids.shape[0]):
            for t in range(1, ids.shape[1]):
                if not mask[b, t - 1]:
                    before[b, t] = before[b, t - 1]
        want = (returns[:, None] - before) * mask * spread[:, None]
        assert torch.allclose(adv, want, atol=1e-5)

    trainer = train(SvebGRPOTrainer, tmp_path, tokenizer, seed, value_estimator="hista", prompts=VARIED_PROMPTS)
    last = trainer.sveb_last
    assert not last.batch.state_mask[:, 2:5].any() and not last.token_mask[:, 2:5].any()
    assert last.batch.hidden.shape[0] == int(last.token_mask.sum())


def test_fallback_forward_runs_as_trl_runs_its_own(tmp_path, tokenizer, seed, monkeypatch):
    """No TRL forward (num_iterations=1, no vLLM): the extra forward goes through TRL's own
    `_get_per_token_logps_and_entropies` (autocast, the wrapped model, TRL's chunks) with the
    batch's multimodal inputs, under no_grad."""
    generate = GRPOTrainer._generate_and_score_completions
    forward = GRPOTrainer._get_per_token_logps_and_entropies
    calls = []

    def with_images(self, inputs):  # as TRL's output carries a VLM's inputs
        out = generate(self, inputs)
        out["num_images"] = [0] * out["completion_ids"].shape[0]
        return out

    def spy(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        calls.append(dict(model=model, grad=torch.is_grad_enabled(), kwargs=dict(kwargs), rows=input_ids.shape[0]))
        kwargs.pop("num_images", None)  # the tiny text model takes no images
        return forward(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", with_images)
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", spy)
    trainer = train(SvebGRPOTrainer, tmp_path, tokenizer, seed, value_estimator="hista", prompts=VARIED_PROMPTS)
    extra = [c for c in calls if not c["grad"]]
    assert len(extra) == len(trainer.generated)
    for call in extra:
        assert call["model"] is trainer.model
        assert call["kwargs"]["num_images"] == [0] * call["rows"]
        assert call["kwargs"]["batch_size"] == trainer.args.per_device_train_batch_size


def test_a_stateful_estimator_is_checkpointed_and_resumed(tmp_path, tokenizer, seed):
    """An estimator with state_dict()/load_state_dict() (e.g. a learned one) is saved into each
    checkpoint folder and restored by `train(resume_from_checkpoint=...)`."""
    from sveb_kernels.estimators import Estimator, GroupMean

    class Counting(Estimator):  # GRPO's baseline, plus state: steps seen and the returns' running sum
        name = "counting"

        def __init__(self):
            self.steps, self.total = 0, torch.zeros(())

        def estimate(self, batch):
            self.steps += 1
            self.total = self.total + batch.returns.sum()
            return GroupMean().estimate(batch)

        def state_dict(self):
            return {"steps": self.steps, "total": self.total.clone()}

        def load_state_dict(self, state):
            self.steps, self.total = int(state["steps"]), state["total"].clone()

    def trainer_with(estimator, max_steps):
        args = config(tmp_path, tokenizer, seed, max_steps=max_steps, save_strategy="steps", save_steps=1)
        return SvebGRPOTrainer(model=tiny.build_model(tokenizer, seed=seed % 1000), reward_funcs=reward, args=args,
                               train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}),
                               processing_class=tokenizer, value_estimator=estimator)

    first = Counting()
    trainer_with(first, 2).train()
    saved = torch.load(tmp_path / "out" / "checkpoint-1" / "sveb_estimator.pt", weights_only=True)
    assert saved["steps"] == 1 and (tmp_path / "out" / "checkpoint-2" / "sveb_estimator.pt").exists()

    resumed = Counting()
    trainer_with(resumed, 2).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert resumed.steps == 2  # one restored, one run after the resume
    assert torch.equal(torch.load(tmp_path / "out" / "checkpoint-2" / "sveb_estimator.pt",
                                  weights_only=True)["total"], resumed.total)
    assert float(resumed.total) >= float(saved["total"])

    plain = Counting()  # a checkpoint without the file: a warning, the initial state
    (tmp_path / "out" / "checkpoint-1" / "sveb_estimator.pt").unlink()
    with pytest.warns(RuntimeWarning, match="sveb_estimator.pt"):
        trainer_with(plain, 2).train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    assert plain.steps == 1


def test_a_trl_outside_the_tested_range_warns(monkeypatch):
    """The [trl] extra is a floor, not a pin: a newer TRL installs, and the trainer says it is untested."""
    from sveb_kernels.integrations import trl as integration

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.warns(UserWarning, match="tested with trl >=1.16,<1.17, found 1.17.0"):
        integration._check_trl_version()
    monkeypatch.setattr(trl, "__version__", "1.16.3")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        integration._check_trl_version()
