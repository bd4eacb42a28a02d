"""Exploratory (not preregistered; docs/RL_EXPERIMENT_TD.md section 2): policy-gradient signal-to-noise of
grpo / oracle / oracle_td advantages on the same rollouts from the cached warm start.

    python examples/rl_credit_grad_snr.py 24 bench/results/rl_credit/grad_snr_td.json            # fresh prompts per batch
    python examples/rl_credit_grad_snr.py 24 bench/results/rl_credit/grad_snr_td_fixed.json --fixed  # the same 8 prompts
    python examples/rl_credit_grad_snr.py 24 bench/results/rl_credit_progress/grad_snr.json --progress
        # the third testbed's warm start and reward (docs/RL_EXPERIMENT_PROGRESS.md, section 3)

Per arm: mean over K batches of the flattened gradient g_k;
SNR = ||mean||^2 / (mean_k ||g_k - mean||^2 / K) (variance of the mean), and the mean cosine of g_k with
the pooled mean over all arms (the common expected direction)."""
import sys, time, json
import numpy as np, torch
sys.path.insert(0, "examples")
import rl_credit as rc

torch.set_num_threads(1)
K = int(sys.argv[1]) if len(sys.argv) > 1 else 16
PROGRESS = "--progress" in sys.argv
cfg = rc.Config(**{**rc.asdict(rc.Config()), **rc.PROGRESS_SETTINGS}) if PROGRESS else rc.Config()
state = torch.load("bench/results/rl_credit_progress/warm.pt" if PROGRESS else "bench/results/rl_credit/warm.pt",
                   weights_only=False)["state"]
model = rc.build_model(cfg); model.load_state_dict(state)
params = [p for p in model.parameters()]
group = torch.arange(cfg.prompts).repeat_interleave(cfg.group)
rng = np.random.default_rng(777); gen = torch.Generator().manual_seed(777)
grads = {a: [] for a in ("grpo", "oracle", "oracle_td")}
FIXED = rc.draw_prompts(np.random.default_rng(778), cfg.prompts, held_out=False) if "--fixed" in sys.argv else None
t0 = time.time()
for k in range(K):
    pairs = FIXED if FIXED is not None else rc.draw_prompts(rng, cfg.prompts, held_out=False)
    ids = rc.sample(model, rc.prompt_tokens(pairs), cfg.group, cfg.completion_len, gen)
    correct = rc.chain_tokens(pairs, cfg.lines).repeat_interleave(cfg.group, dim=0)
    rollouts = ids[:, rc.PROMPT_LEN:]
    rewards = rc.rewards_of(rollouts, correct, cfg)
    truth = rc.rollout_values(rc.exact_values(model, pairs, cfg).repeat_interleave(cfg.group, dim=0), rollouts, correct,
                              cfg)
    gm = rewards.view(cfg.prompts, -1).mean(1).repeat_interleave(cfg.group)[:, None].expand_as(truth)
    model.train()
    logp, _ = rc.completion_logprobs(model, ids)
    advs = {"grpo": rc.scaled_advantages(gm, rewards, group, cfg.prompts),
            "oracle": rc.scaled_advantages(truth, rewards, group, cfg.prompts),
            "oracle_td": rc.td_scaled_advantages(truth, rewards, group, cfg.prompts)}
    for a, adv in advs.items():
        g = torch.autograd.grad(-(adv.float() * logp).mean(), params, retain_graph=True)
        grads[a].append(torch.cat([x.flatten() for x in g]).double())
pooled = torch.stack([g for a in grads for g in grads[a]]).mean(0)
out = {}
for a, gs in grads.items():
    G = torch.stack(gs); m = G.mean(0)
    var_of_mean = ((G - m) ** 2).sum(1).mean() / len(gs)
    cos = torch.nn.functional.cosine_similarity(G, pooled[None], dim=1)
    out[a] = {"snr_of_mean": float(m.square().sum() / var_of_mean), "per_batch_snr": float(m.square().sum() / ((G - m) ** 2).sum(1).mean()),
              "cos_with_pooled_mean": float(cos.mean()), "grad_norm": float(G.norm(dim=1).mean())}
    print(a, {k: round(v, 4) for k, v in out[a].items()}, flush=True)
print(f"{K} batches, {time.time() - t0:.0f}s")
json.dump({"batches": K, "arms": out}, open(sys.argv[2] if len(sys.argv) > 2 else "/tmp/i22b_diag/grad_snr.json", "w"), indent=1)
