"""One process of 2-process SvebGRPOTrainer runs on CPU (gloo), started by
tests/test_integration_trl.py::test_groups_spanning_processes; argv[1] is the output folder. One run
per estimator: numca and hista (sharded through sveb_kernels.distributed), hista_whole (the same Hista
as a callable, so it gets the gathered whole batch) and rloo_whole (a plain callable)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from sveb_kernels.estimators import Hista, LeaveOneOutMean  # noqa: E402
from sveb_kernels.integrations.trl import SvebGRPOTrainer  # noqa: E402
from sveb_kernels.sveb import tiny  # noqa: E402


def reward(completions, **kwargs):
    return [float(c.count("3")) + 0.5 * c.count("+") for c in completions]


class Recording(SvebGRPOTrainer):
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        last = self.sveb_last
        self.records.append({"completion_ids": out["completion_ids"].clone(), "advantages": out["advantages"].clone(),
                             "completion_mask": out["completion_mask"].clone(),
                             "all_token_ids": last.token_ids.clone(), "all_advantages": last.advantages.clone(),
                             "all_returns": last.returns.clone(), "all_token_mask": last.token_mask.clone()})
        return out


def whole_batch(estimator):
    def fn(batch):
        assert batch.shard is None and batch.shape[0] == 12, "a callable must see the whole batch"
        return estimator.estimate(batch)
    return fn


ESTIMATORS = {"numca": lambda: "numca", "hista": lambda: "hista",
              "hista_whole": lambda: whole_batch(Hista("cosine", 0.05)),
              "rloo_whole": lambda: whole_batch(LeaveOneOutMean())}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    tokenizer = tiny.build_tokenizer()
    vocab = tokenizer.get_vocab()
    allowed = {vocab[t] for t in ["1", "2", "3", "Ġ", "Ġ+", "Ġ="]}
    results = {}
    for name, make in ESTIMATORS.items():
        args = GRPOConfig(output_dir=os.path.join(out_dir, "run"), per_device_train_batch_size=6, num_generations=4,
                          max_completion_length=8, max_steps=2, learning_rate=1e-2, report_to="none",
                          save_strategy="no", use_cpu=True, seed=7, scale_rewards="none", logging_steps=1,
                          generation_kwargs={"suppress_tokens": sorted(set(range(len(tokenizer))) - allowed)})
        trainer = Recording(model=tiny.build_model(tokenizer, seed=1), reward_funcs=reward, args=args,
                            train_dataset=Dataset.from_dict({"prompt": ["Compute: 3 + 4", "Compute: 12 + 7",
                                                                        "Compute: 5 - 2", "Compute: 9 + 9"]}),
                            processing_class=tokenizer, value_estimator=make(), hista_temperature=0.05)
        trainer.records = []
        trainer.train()
        results[name] = trainer.records
    rank = trainer.accelerator.process_index
    torch.save({"world": trainer.accelerator.num_processes, "results": results}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
