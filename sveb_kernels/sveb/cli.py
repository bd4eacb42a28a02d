"""`sveb-kernels sveb build|eval`: argument parsing and wiring; the work lives in the modules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .progress import log


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `sveb` command (with `build` and `eval`) to an argparse subparsers object."""
    sveb = subparsers.add_parser("sveb", help="SVEB: build value datasets and score state value estimators",
                                 description="State Value Estimation Benchmark (docs/SVEB.md).")
    commands = sveb.add_subparsers(dest="sveb_command", required=True)
    _add_build(commands)
    _add_eval(commands)
    return sveb


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weights' dtype (auto: float32 on CPU, the checkpoint's on GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def _add_build(commands) -> None:
    p = commands.add_parser("build", help="sample rollouts and Monte-Carlo (or exact) state values into a dataset",
                            description="Writes a dataset directory (meta.json + groups.jsonl). Re-running the "
                                        "same command resumes an interrupted build.")
    p.add_argument("--out", required=True, help="dataset directory to write (or resume)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a Hugging Face causal LM (local path or cached id): the policy")
    src.add_argument("--task", choices=["arith"], help="the embedded arithmetic-chain task")
    p.add_argument("--prompts", help="with --model: JSONL of {\"prompt\", \"answer\"[, \"id\"]}")
    p.add_argument("--policy", choices=["exact", "model"], default="exact",
                   help="with --task arith: 'exact' = the task's own policy with exact values (default); "
                        "'model' = the tiny transformer samples and values are Monte Carlo")
    p.add_argument("--num-prompts", type=int, default=64, help="with --task arith: prompts per split (default 64)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="with --task arith: training steps of the tiny model (default 0 for --policy exact, "
                        "600 for --policy model)")
    p.add_argument("-G", "--group-size", type=int, default=8, help="rollouts per prompt (default 8)")
    p.add_argument("-K", "--continuations", type=int, default=16, help="Monte-Carlo continuations per state (16)")
    p.add_argument("--states-per-rollout", type=int, default=8, help="states per rollout, evenly spaced (8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response token budget (256)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut (default)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per generate() call (64)")
    p.add_argument("--train-fraction", type=float, default=0.5, help="share of prompts in the train split (0.5)")
    p.add_argument("--reward", default="numeric",
                   help="'numeric' (last number == answer) or module:function / file.py:function "
                        "taking (response_text, answer, prompt) -> float")
    p.add_argument("--chat-template", action="store_true", help="wrap prompts in the tokenizer's chat template")
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    _common(p)
    p.set_defaults(func=_run_build)


def _add_eval(commands) -> None:
    p = commands.add_parser("eval", help="score value estimators against the truth",
                            description="Scores estimators on a dataset's eval split (default: the embedded "
                                        "arithmetic task, built in memory).")
    p.add_argument("--data", help="dataset directory or groups file (default: the embedded task)")
    p.add_argument("--model", help="HF causal LM for hidden states (default: the dataset's meta.json model, "
                                   "or the embedded tiny model)")
    p.add_argument("--tokenizer", help="tokenizer path (default: the model's)")
    p.add_argument("--layer", type=int, default=-1, help="hidden_states index: 0 embeddings, -1 last (default)")
    p.add_argument("--quick", action="store_true", help="a small embedded task and 200 bootstrap resamples")
    p.add_argument("--prompts", type=int, default=None, help="embedded task: prompts per split (128; quick 48)")
    p.add_argument("--group-size", type=int, default=16, help="embedded task: rollouts per prompt (16)")
    p.add_argument("--train-steps", type=int, default=0,
                   help="embedded task: training steps of the tiny model before reading hidden states "
                        "(default 0: random init)")
    p.add_argument("--estimators", help="comma-separated subset of the built-in estimators (default: all); "
                                        "names: group_mean,rloo,critic,numca_last,numca_prefix,hista_cos,hista_dot")
    p.add_argument("--estimator", action="append", default=[], metavar="NAME=module:attr",
                   help="add your estimator: a function fn(batch) -> values[B, L] or an Estimator (repeatable)")
    p.add_argument("--temperatures", default="0.01,0.03,0.1,0.3,1",
                   help="Hista temperature sweep (dot: in units of the mean squared hidden-state norm)")
    p.add_argument("--backend", default="auto", help="sveb_kernels backend for the Hista and Numca ops")
    p.add_argument("--bootstrap", type=int, default=None, help="group resamples for the CIs (1000; quick 200)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass for hidden states (16)")
    p.add_argument("--json", action="store_true", help="print {\"estimators\": {name: {metric: value}}} only")
    p.add_argument("--out", help="also write the JSON result to this file")
    p.add_argument("--plot", help="write value curves along a few rollouts to this image (needs matplotlib)")
    p.add_argument("--plot-estimators", help="comma-separated estimators to draw (default: a representative few)")
    _common(p)
    p.set_defaults(func=_run_eval)


def _model_and_tokenizer(path: str, args):
    from .features import load_model, resolve_device

    device = resolve_device(args.device)
    model, tokenizer = load_model(path, device=device, dtype=args.dtype)
    return model, tokenizer, device


def _run_build(args: argparse.Namespace) -> int:
    from .build import BuildConfig, build_dataset, read_prompts
    from .features import resolve_device
    from .rewards import load_reward

    config = BuildConfig(group_size=args.group_size, continuations=args.continuations,
                         states_per_rollout=args.states_per_rollout, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         batch_size=args.batch_size, train_fraction=args.train_fraction, seed=args.seed,
                         chat_template=args.chat_template)
    if args.task:
        from .embedded_build import build_arith

        out = build_arith(Path(args.out), policy=args.policy, num_prompts=args.num_prompts,
                          train_steps=args.train_steps, config=config, device=resolve_device(args.device),
                          fmt=args.format, show_progress=not args.no_progress)
    else:
        if not args.prompts:
            raise SystemExit("sveb build --model needs --prompts FILE.jsonl")
        model, tokenizer, device = _model_and_tokenizer(args.model, args)
        out = build_dataset(model, tokenizer, read_prompts(args.prompts), args.out, config, load_reward(args.reward),
                            model_ref=args.model, reward_ref=args.reward, fmt=args.format, device=device,
                            show_progress=not args.no_progress)
    log(f"dataset written to {out}")
    return 0


def _select_estimators(args, seed: int):
    from .estimators import DEFAULT_TEMPERATURES, LeaveOneOutMean, as_estimator, default_estimators, load_object

    temperatures = DEFAULT_TEMPERATURES
    if args.temperatures:
        try:
            temperatures = tuple(float(t) for t in args.temperatures.split(","))
        except ValueError:
            raise SystemExit(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}") from None
        if not all(t > 0 and t != float("inf") for t in temperatures):
            raise SystemExit(f"--temperatures must all be positive and finite, got {args.temperatures!r}")
    estimators = default_estimators(temperatures=temperatures, backend=args.backend, seed=seed)
    if args.estimators:
        wanted = [w.strip() for w in args.estimators.split(",") if w.strip()]
        known = {e.name for e in estimators} | {"hista_cos", "hista_dot", "hista", "numca"}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"unknown estimators {unknown}; built-in: {sorted(e.name for e in estimators)} "
                             "(hista_cos / hista_dot / hista / numca select a family)")
        estimators = [e for e in estimators
                      if e.name in wanted or any(e.name.startswith(w + "_") for w in wanted)]
        if not any(e.name == "rloo" for e in estimators):  # the null row every table keeps (docs/SVEB.md)
            estimators.insert(0, LeaveOneOutMean())
    for spec in args.estimator:
        name, sep, target = spec.partition("=")
        if not sep:
            name, target = "", spec
        estimators.append(as_estimator(load_object(target), name or None))
    return estimators


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from .evaluate import evaluate
    from .features import hidden_states_fn, resolve_device

    say = (lambda _m: None) if args.json and args.no_progress else log
    bootstrap = args.bootstrap if args.bootstrap is not None else (200 if args.quick else 1000)
    device = resolve_device(args.device)
    model = tokenizer = None
    if args.data:
        from .data import load_dataset

        dataset = load_dataset(args.data)
        model_path = args.model or dataset.resolve("model")
        if model_path:
            model, tokenizer, device = _model_and_tokenizer(model_path, args)
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from . import embedded, tiny

        base = embedded.QUICK if args.quick else embedded.EmbeddedConfig()
        prompts = args.prompts or base.eval_prompts
        config = embedded.EmbeddedConfig(train_prompts=prompts, eval_prompts=prompts, group_size=args.group_size,
                                         train_steps=args.train_steps, seed=args.seed)
        if args.model:  # the task's text in this model's tokens
            model, tokenizer, device = _model_and_tokenizer(args.model, args)
            dataset = embedded.arith_dataset(tokenizer, config)
        else:
            tokenizer = tiny.build_tokenizer()
            dataset = embedded.arith_dataset(tokenizer, config)
            model = embedded.embedded_model(tokenizer, config, log=say).to(device)
    hidden_fn = None
    if model is not None:
        hidden_fn = hidden_states_fn(model, layer=args.layer, batch_size=args.batch_size, device=device,
                                     show_progress=not args.no_progress)
    estimators = _select_estimators(args, args.seed)
    threads = torch.get_num_threads()
    if not args.data and not args.model:
        # The embedded task's tensors are tiny: one thread is as fast, and OpenMP threads spinning
        # on a core a neighbour holds make a shared 2-core machine several times slower.
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            result = evaluate(dataset, estimators, tokenizer=tokenizer, hidden_fn=hidden_fn, device=device,
                              bootstrap=bootstrap, seed=args.seed, log=say)
    finally:
        torch.set_num_threads(threads)
    result.meta.update({"model": args.model or (dataset.meta.get("model") if args.data else "embedded tiny llama"),
                        "layer": args.layer, "device": str(device)})
    if not args.data:
        result.meta["embedded"] = {"prompts_per_split": prompts, "group_size": args.group_size,
                                   "train_steps": args.train_steps}
    text = result.dumps()
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if args.plot:
        from .plot import plot_curves

        names = [n.strip() for n in args.plot_estimators.split(",")] if args.plot_estimators else None
        plot_curves(result, args.plot, estimators=names)
        say(f"plot written to {args.plot}")
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        print(result.table())
    return 0


def main(argv=None) -> int:
    """`python -m sveb_kernels.sveb.cli ...` without the top-level command."""
    parser = argparse.ArgumentParser(prog="sveb")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sveb", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
