"""The one-parameter model of docs/RL_EXPERIMENT_PROGRESS.md, section 1: per-rollout signal-to-noise of
the policy gradient with respect to the error logit of an L-line chain whose lines fail independently
with probability e (every line shares the parameter), under GRPO (R - exact mean), the oracle
(R - V(s_t)) and the TD oracle (V(s_{t+1}) - V(s_t)), for the "chain" and "progress" rewards.
Exact enumeration of the L + 1 outcomes; prints (mean, mean / std) per estimator.

    python examples/rl_credit_snr.py
"""
import numpy as np
def snr(L, e, reward="progress"):
    # outcomes: fail at line k (1..L) with prob (1-e)^(k-1) e, or success with (1-e)^L
    ks = list(range(1, L+1)) + [None]
    probs = [(1-e)**(k-1)*e for k in range(1, L+1)] + [(1-e)**L]
    def R(k):
        if reward == "chain": return 1.0 if k is None else 0.0
        return 1.0 if k is None else (k-1)/L
    b = sum(p*R(k) for k, p in zip(ks, probs))
    # exact value before line j (j = 1..L), given all earlier ok: progress so far + expected future
    def V(j):  # before line j; lines 1..j-1 done
        if reward == "chain": return (1-e)**(L-j+1)
        return ((j-1) + sum((1-e)**(m-j+1) for m in range(j, L+1)))/L
    def Vafter_err(k): return R(k)
    out = {}
    for name in ("grpo", "oracle", "td"):
        vals = []
        for k in ks:
            n = L if k is None else k
            tot = 0.0
            for j in range(1, n+1):
                err = (k == j)
                score = (1-e) if err else -e  # d log p / d logit_err
                if name == "grpo": A = R(k) - b
                elif name == "oracle": A = R(k) - V(j)
                else:
                    nxt = Vafter_err(k) if err else (V(j+1) if j < L else R(k))
                    A = nxt - V(j)
                tot += score*A
            vals.append(tot)
        vals = np.array(vals); p = np.array(probs)
        m = (p*vals).sum(); v = (p*(vals-m)**2).sum()
        out[name] = (round(float(m), 4), round(float(m / np.sqrt(v)), 3))
    return out
for L in (8, 16):
    for e in (0.05, 0.1, 0.2, 0.3):
        print(L, e, "progress", snr(L, e), "chain", snr(L, e, "chain"))
