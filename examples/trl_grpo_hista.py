"""GRPO with token-level Hista advantages in TRL: `SvebGRPOTrainer(value_estimator="hista")`.

    python examples/trl_grpo_hista.py                                      # CPU, tiny local model, < 2 min
    python examples/trl_grpo_hista.py --model Qwen/Qwen2.5-0.5B-Instruct   # GPU, a real model

The same arithmetic task as trl_grpo_numca.py. Hista values a token by the returns of the group's
other completions' tokens, weighted by the similarity of the policy's hidden states (the last
layer's, at the position before each token, read by a forward hook); a token's advantage is
R - V(state before it).
"""

from trl_grpo_numca import parse_args, run

if __name__ == "__main__":
    a = parse_args(__doc__.splitlines()[0])
    run("hista", model=a.model, steps=a.steps, pretrain_steps=a.pretrain_steps, output_dir=a.output_dir,
        hista_temperature=0.1, hista_similarity="cosine", hidden_layer=-1)
