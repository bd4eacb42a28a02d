"""examples/rl_credit.py: the exact values against Monte-Carlo continuations from prefixes, the task's
pieces, the advantage scaling, the statistics, and --quick end to end (every arm, two seeds)."""

import json
import math
import os

import numpy as np
import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def rc():
    import sys

    sys.path.insert(0, EXAMPLES)
    try:
        import rl_credit
    finally:
        sys.path.remove(EXAMPLES)
    return rl_credit


@pytest.fixture(scope="module")
def trained(rc):
    """A small model trained on slipping demonstrations of two prompts (slip 0.3 per result), so
    that their values lie far from 0 and 1 at every state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = rc.Config(lines=3, width=32, layers=1, heads=2)
        model = rc.build_model(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        rng = np.random.default_rng(0)
        pairs = np.array([[17, 36], [5, 7]] * 32)
        for _ in range(200):
            ids = torch.cat([rc.prompt_tokens(pairs), rc.chain_tokens(pairs, cfg.lines,
                                                                      rc.demo_slips(rng, len(pairs), 3, 0.3))], 1)
            loss = -rc.completion_logprobs(model, ids)[0].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return cfg, model


def test_chain_tokens_are_the_task(rc):
    pairs = np.array([[98, 3], [0, 0]])
    ids = rc.chain_tokens(pairs, 2)
    assert ids[0].tolist() == [98, rc.PLUS, 3, rc.EQUALS, 1, rc.NEWLINE, 1, rc.PLUS, 3, rc.EQUALS, 4, rc.NEWLINE]
    slipped = rc.chain_tokens(pairs, 2, np.array([[10, 0], [0, -1]]))
    assert slipped[0, 4] == 11 and slipped[0, 6] == 11 and slipped[0, 10] == 14  # the chain goes on from the slip
    assert slipped[1, 10] == 99  # modulo 100
    assert rc.decision_mask(rc.Config(lines=2)).nonzero().flatten().tolist() == [4, 10]


def test_held_out_prompts_are_never_drawn_for_training(rc):
    rng = np.random.default_rng(0)
    train = rc.draw_prompts(rng, 500, held_out=False)
    held = rc.draw_prompts(rng, 50, held_out=True)
    assert not any(rc.is_held_out(int(a), int(b)) for a, b in train)
    assert all(rc.is_held_out(int(a), int(b)) for a, b in held)


def test_incremental_sampling_matches_a_full_forward(rc, trained):
    """The KV-cached decoding computes the same distribution as a full causal forward."""
    cfg, model = trained
    pairs = np.array([[5, 7], [42, 99]])
    ids = torch.cat([rc.prompt_tokens(pairs), rc.chain_tokens(pairs, cfg.lines)], dim=1)
    model.eval()
    with torch.no_grad():
        full, _, _ = model(ids)
        logits, _, cache = model(ids[:, :rc.PROMPT_LEN])
        steps = [logits[:, -1]]
        for t in range(rc.PROMPT_LEN, ids.shape[1] - 1):
            logits, _, cache = model(ids[:, t:t + 1], past=cache, start=t)
            steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, rc.PROMPT_LEN - 1:-1], atol=2e-5, rtol=1e-5)


def test_exact_values_match_monte_carlo_continuations(rc, trained):
    """V(s_t) in closed form vs the success rate of N sampled continuations of the prefix (the
    cached decoding, checked against full forwards above), for correct prefixes of several lengths;
    after a wrong token the value is exactly 0."""
    cfg, model = trained
    pairs = np.array([[17, 36]])
    correct = rc.chain_tokens(pairs, cfg.lines)
    v = rc.exact_values(model, pairs, cfg)[0]
    assert 0.02 < float(v[0]) < 0.98, "the test model should be neither hopeless nor perfect"
    n = 2000
    gen = torch.Generator().manual_seed(0)
    prompt = rc.prompt_tokens(pairs)
    for t in (0, 4, 10, cfg.completion_len - 2):
        prefix = torch.cat([prompt, correct[:, :t]], dim=1)
        ids = rc.sample(model, prefix, n, cfg.completion_len - t, gen)
        mc = float((ids[:, rc.PROMPT_LEN:] == correct).all(dim=1).double().mean())
        sd = math.sqrt(max(float(v[t]) * (1 - float(v[t])), 1e-4) / n)
        assert abs(mc - float(v[t])) < 5 * sd + 1e-3, (t, mc, float(v[t]))
    # the rows of a batch: the correct chain's value before the first wrong token, 0 after
    rollouts = correct.repeat(2, 1)
    rollouts[1, 4] = (rollouts[1, 4] + 1) % 100
    values = rc.rollout_values(v[None].repeat(2, 1), rollouts, correct.repeat(2, 1))
    torch.testing.assert_close(values[0], v)
    torch.testing.assert_close(values[1, :5], v[:5])
    assert (values[1, 5:] == 0).all()


def test_progress_values_match_monte_carlo_continuations(rc, trained):
    """The "progress" reward (share of lines right before the first wrong token): the closed form
    against the mean reward of N sampled continuations of correct prefixes, at line starts, inside
    lines and at the last state; after a wrong token the value is the lines already finished."""
    cfg, model = trained
    cfg = rc.Config(**{**rc.asdict(cfg), "reward": "progress"})
    pairs = np.array([[17, 36]])
    correct = rc.chain_tokens(pairs, cfg.lines)
    v = rc.exact_values(model, pairs, cfg)[0]
    n = 2000
    gen = torch.Generator().manual_seed(1)
    prompt = rc.prompt_tokens(pairs)
    for t in (0, 3, 6, 10, 13, cfg.completion_len - 1):
        prefix = torch.cat([prompt, correct[:, :t]], dim=1)
        ids = rc.sample(model, prefix, n, cfg.completion_len - t, gen)
        r = rc.rewards_of(ids[:, rc.PROMPT_LEN:], correct.expand(n, -1), cfg)
        assert r.unique().numel() > 1, "the continuations should differ in reward"
        sd = math.sqrt(max(float(r.var()), 1e-4) / n)
        assert abs(float(r.mean()) - float(v[t])) < 5 * sd + 1e-3, (t, float(r.mean()), float(v[t]))
    # a plain loop over the definition: V = (lines done + sum over open lines of P(reach its end)) / lines
    q = torch.exp(rc.completion_logprobs(model, torch.cat([prompt, correct], 1))[0][0].detach().double())
    for t in range(cfg.completion_len):
        expected = t // 6 + sum(float(torch.prod(q[t:6 * k + 6])) for k in range(cfg.lines) if 6 * k + 5 >= t)
        assert float(v[t]) == pytest.approx(expected / cfg.lines, rel=1e-9)
    # a wrong token in line 1 (token 8): the value after it is line 0 only, 1/3
    rollouts = correct.repeat(2, 1)
    rollouts[1, 8] = (rollouts[1, 8] + 1) % 100
    values = rc.rollout_values(v[None].repeat(2, 1), rollouts, correct.repeat(2, 1), cfg)
    torch.testing.assert_close(values[0], v)
    torch.testing.assert_close(values[1, :9], v[:9])
    assert (values[1, 9:] == 1 / 3).all()
    assert rc.rewards_of(rollouts, correct.repeat(2, 1), cfg).tolist() == [1.0, 1 / 3]


def test_progress_values_of_a_hopeless_policy_are_finite(rc):
    """A policy that puts almost no mass on the correct chain: finished lines' log-products are
    huge positive numbers that must not reach exp (inf * 0 = NaN); the values are ~lines done / lines."""
    cfg = rc.Config(lines=3, width=16, layers=1, heads=2, reward="progress")
    model = rc.build_model(cfg)
    with torch.no_grad():  # the head reads a constant vector of ones and gives BOS a logit of 100 * width
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.head.weight.zero_()
        model.head.weight[rc.BOS] = 100.0
    v = rc.exact_values(model, np.array([[17, 3]]), cfg)[0]
    assert torch.isfinite(v).all(), v
    torch.testing.assert_close(v, (torch.arange(cfg.completion_len) // 6).double() / cfg.lines, atol=1e-12, rtol=0)


def test_rewards_of_each_kind(rc):
    correct = torch.arange(12).repeat(4, 1)
    rollouts = correct.clone()
    rollouts[1, 0] = 99   # first token of line 0
    rollouts[2, 11] = 99  # last token of line 1
    rollouts[3, 6] = 99   # first token of line 1, and a later one
    rollouts[3, 9] = 98
    chain = rc.rewards_of(rollouts, correct, rc.Config(lines=2, reward="chain"))
    progress = rc.rewards_of(rollouts, correct, rc.Config(lines=2, reward="progress"))
    assert chain.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert progress.tolist() == [1.0, 0.0, 0.5, 0.5]


def test_ramp_slips_rise_along_the_chain(rc):
    """slip_profile="ramp": line k slips with slip (k+1)/lines in the demonstrations; "flat": slip on every line."""
    ramp = rc.Config(lines=4, slip=0.4, slip_profile="ramp")
    np.testing.assert_allclose(rc.line_slip_probabilities(ramp), [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(rc.line_slip_probabilities(rc.Config(lines=3, slip=0.2)), [0.2, 0.2, 0.2])
    n = 40_000
    slips = rc.demo_slips(np.random.default_rng(0), n, 4, rc.line_slip_probabilities(ramp))
    rate = (slips != 0).mean(axis=0)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    assert (np.abs(rate - p) < 5 * np.sqrt(p * (1 - p) / n)).all(), rate
    assert set(np.unique(slips)) <= {0, *rc.SLIPS}


def test_warm_start_cache_from_before_slip_profiles_still_loads(rc, tmp_path):
    """A cached warm start whose key predates slip_profile is the "flat" one."""
    cfg = rc.quick_config()
    key = rc.warm_key(cfg)
    del key["slip_profile"]
    path = str(tmp_path / "warm.pt")
    state = {k: v.clone() for k, v in rc.build_model(cfg).state_dict().items()}
    torch.save({"key": key, "state": state, "history": [{"success": 0.5}]}, path)
    loaded, history = rc.load_or_make_warm(cfg, path, lambda msg: None)
    assert history == [{"success": 0.5}] and loaded.keys() == state.keys()


def test_advantage_scaling_gives_all_equal_groups_zero_signal(rc):
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    group = torch.arange(2).repeat_interleave(4)
    values = torch.rand(8, 5, dtype=torch.float64)
    adv = rc.scaled_advantages(values, rewards, group, 2)
    assert (adv[4:] == 0).all()  # all-equal group: no signal, however far the values are from R
    std = rewards[:4].double().std()
    torch.testing.assert_close(adv[:4], (rewards[:4, None].double() - values[:4]) / std)


def test_td_advantages_are_one_step_differences_of_the_values(rc):
    """GAE with gamma 1, lambda 0: A_t = V(s_{t+1}) - V(s_t), V after the last token = R, scaled by
    the group's reward std; all-equal groups get 0. Oracle form: with exact values on a chain, a
    correct token gets V_t (1/pi_t - 1), the first wrong token -V_t, later tokens 0."""
    gen = torch.Generator().manual_seed(3)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    group = torch.arange(2).repeat_interleave(3)
    values = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    adv = rc.td_scaled_advantages(values, rewards, group, 2)
    assert (adv[3:] == 0).all()
    std = rewards[:3].double().std()
    for i in range(3):  # plain loop: the definition, token by token
        for t in range(5):
            nxt = values[i, t + 1] if t + 1 < 5 else rewards[i].double()
            assert adv[i, t].item() == pytest.approx(((nxt - values[i, t]) / std).item(), rel=1e-12, abs=1e-15)
    # the sum over tokens telescopes to (R - V_0) / std: the same total credit as the R - V arm's first token
    torch.testing.assert_close(adv[:3].sum(1), (rewards[:3].double() - values[:3, 0]) / std)
    # exact values of a 3-token chain with pi = (0.5, 0.8, 0.9): the correct rollout and one wrong at token 1
    pi = torch.tensor([0.5, 0.8, 0.9], dtype=torch.float64)
    v_correct = pi.flip(0).cumprod(0).flip(0)
    truth = rc.rollout_values(v_correct.repeat(2, 1), torch.tensor([[1, 2, 3], [1, 7, 3]]), torch.tensor([[1, 2, 3]] * 2))
    a = rc.td_scaled_advantages(truth, torch.tensor([1.0, 0.0]), torch.zeros(2, dtype=torch.int64), 1) * math.sqrt(0.5)
    torch.testing.assert_close(a[0], v_correct * (1 / pi - 1))
    torch.testing.assert_close(a[1], torch.stack([v_correct[0] * (1 / pi[0] - 1), -v_correct[1],
                                                  torch.zeros((), dtype=torch.float64)]))


def test_paired_statistics_and_verdicts(rc):
    p = rc.paired([0.1, 0.2, 0.3])
    assert math.isclose(p["mean"], 0.2) and math.isclose(p["sd"], 0.1)
    half = 4.303 * 0.1 / math.sqrt(3)
    assert math.isclose(p["lo"], 0.2 - half) and math.isclose(p["hi"], 0.2 + half)
    gain = lambda mean, lo, hi: {"mean": mean, "lo": lo, "hi": hi, "n": 4}
    assert rc.verdict(gain(0.05, 0.01, 0.09), oracle_gain=0.1) == "helps"
    assert rc.verdict(gain(0.02, 0.01, 0.03), oracle_gain=0.1) != "helps"  # CI excludes 0 but < 25% of the oracle
    assert rc.verdict(gain(0.0, -0.01, 0.02), oracle_gain=0.1) == "does not help"
    assert rc.verdict(gain(0.02, -0.02, 0.06), oracle_gain=0.1).startswith("inconclusive")


def test_summary_gates_and_diagnostics_of_sparse_steps(rc):
    """Diagnostics logged every 2nd step (step 1 has none) still reach the summary; oracle_td has its own gate."""
    cfg = rc.Config()

    def run(arm, seed, rewards):
        steps = [{"step": i + 1, "mean_reward": r, "all_equal_groups": 0.0, "step_seconds": 1.0, "estimator_seconds": 0.0,
                  **({"hista/decision_pearson": 0.5} if i % 2 else {})} for i, r in enumerate(rewards)]
        return {"arm": arm, "seed": seed, "auc": float(np.mean(rewards)), "held_out_success": 0.5, "steps": steps}

    runs = [run("grpo", s, [0.5, 0.5]) for s in (0, 1)] + [run("oracle_td", 0, [0.6, 0.6]), run("oracle_td", 1, [0.7, 0.5]),
                                                           run("hista_td", 0, [0.5, 0.6]), run("hista_td", 1, [0.5, 0.6])]
    summary = rc.summarize(runs, cfg)
    assert summary["arms"]["grpo"]["pearson"] == {"hista/decision_pearson": 0.5}
    assert "gate" not in summary and summary["gate_td"]["passed"]  # +0.1 on both seeds
    assert summary["gains"]["hista_td"]["auc"]["mean"] == pytest.approx(0.05)
    assert "verdict" in summary["gains"]["hista_td"]


def test_numca_prefix_values_on_the_task(rc):
    """Numca's prefix match over this vocabulary: peers that wrote the same numbers so far."""
    from sveb_kernels.estimators import RolloutBatch

    cfg = rc.Config(lines=2)
    pairs = np.array([[1, 2]])
    correct = rc.chain_tokens(pairs, 2)
    wrong = rc.chain_tokens(pairs, 2, np.array([[1, 0]]))
    ids = torch.cat([rc.prompt_tokens(pairs).repeat(3, 1), torch.cat([correct, correct, wrong])], 1)
    rewards = torch.tensor([1.0, 1.0, 0.0])
    est = rc.Estimators(cfg)
    batch = est.batch(ids, rewards, torch.zeros(3, dtype=torch.int64), torch.zeros(3, 12, 4))
    v = est.values("numca_prefix", batch)
    # before the first result every peer agrees: leave-one-out mean of the others
    assert v[0, 4] == pytest.approx(0.5) and v[2, 4] == pytest.approx(1.0)
    # after the wrong result is closed, rollout 2's only same-prefix peers are none; rollout 0's is rollout 1
    assert v[0, 6] == pytest.approx(1.0)


def test_quick_mode_runs_every_arm_and_reports(rc, tmp_path):
    out = str(tmp_path)
    summary = rc.main(["--quick", "--out", out, "--seeds", "0,1", "--jobs", "1"])
    runs = os.listdir(os.path.join(out, "runs"))
    assert sorted(runs) == sorted(f"{a}-s{s}.json" for a in rc.ARMS for s in (0, 1))
    with open(os.path.join(out, "rl_credit.json")) as f:
        result = json.load(f)
    assert set(result["summary"]["arms"]) == set(rc.ARMS)
    for name in ("rl_credit.csv", "rl_credit.md", "rl_credit.png", "warm.json"):
        assert os.path.exists(os.path.join(out, name))
    for a in rc.ARMS:
        if a == "grpo":
            continue
        assert summary["gains"][a]["auc"]["n"] == 2
    assert "gate" in summary
    with open(os.path.join(out, "runs", "grpo-s0.json")) as f:
        run = json.load(f)
    assert [s["step"] for s in run["steps"]] == [1, 2, 3]
    for s in run["steps"]:
        assert 0 <= s["mean_reward"] <= 1 and 0 <= s["all_equal_groups"] <= 1
        assert s["group_mean/decision_pearson"] == 0.0  # constant per group: explains nothing within one
    # resumable: a second call runs nothing and reports the same
    again = rc.main(["--quick", "--out", out, "--seeds", "0,1", "--jobs", "1"])
    assert again["gains"]["oracle"]["auc"] == summary["gains"]["oracle"]["auc"]


def test_score_norms_and_the_td_arms(rc, tmp_path):
    """--score-norms reports shares in [0, 1]; the TD arms run only when asked; oracle_td, a control, gets no verdict."""
    out = str(tmp_path)
    norms = rc.main(["--quick", "--out", out, "--score-norms"])
    assert 0.0 <= norms["share_on_error"] <= 1.0 or math.isnan(norms["share_on_error"])
    summary = rc.main(["--quick", "--out", out, "--seeds", "0", "--arms", "grpo,oracle_td"])
    assert set(summary["arms"]) == {"grpo", "oracle_td"} and "verdict" not in summary["gains"]["oracle_td"]
    # the TD amendment's arms (one seed, 3 steps): their own gate and verdicts, report under another name
    td = rc.main(["--quick", "--out", out, "--seeds", "0", "--jobs", "1", "--arms", "oracle_td,numca_td,hista_td",
                  "--report-name", "rl_credit_td"])
    assert {"oracle_td", "numca_td", "hista_td"} <= set(td["arms"]) and "gate_td" in td
    assert td["gate_td"]["control"] == "oracle_td" and "verdict" in td["gains"]["hista_td"]
    assert os.path.exists(os.path.join(out, "rl_credit_td.md"))


def test_progress_reward_end_to_end_and_old_run_files(rc, tmp_path):
    """--reward progress trains and reports with fractional rewards; a run file written before the
    reward option existed (no "reward" in its config) still counts as a "chain" run."""
    out = str(tmp_path)
    norms = rc.main(["--quick", "--reward", "progress", "--out", out, "--score-norms"])
    assert 0.0 <= norms["grpo_pushes_up_first_error"] <= 1.0 or math.isnan(norms["grpo_pushes_up_first_error"])
    summary = rc.main(["--quick", "--reward", "progress", "--out", out, "--seeds", "0", "--arms", "grpo,oracle"])
    assert set(summary["arms"]) == {"grpo", "oracle"}
    with open(os.path.join(out, "runs", "oracle-s0.json")) as f:
        run = json.load(f)
    assert run["config"]["reward"] == "progress"
    for s in run["steps"]:
        assert 0 <= s["mean_reward"] <= 1
    with open(os.path.join(out, "warm.json")) as f:
        assert json.load(f)["reward"] == "progress"
    with pytest.raises(SystemExit):
        rc.main(["--quick", "--reward", "partial", "--out", out])
    # an old-style chain run file in a fresh folder: reported as "chain"
    old = str(tmp_path / "old")
    os.makedirs(os.path.join(old, "runs"))
    run["arm"] = "grpo"
    run["config"] = rc.asdict(rc.quick_config())
    del run["config"]["reward"]
    with open(os.path.join(old, "runs", "grpo-s0.json"), "w") as f:
        json.dump(run, f)
    assert set(rc.main(["--quick", "--out", old, "--report-only"])["arms"]) == {"grpo"}
    assert rc.main(["--quick", "--reward", "progress", "--out", old, "--report-only"]) == {}
