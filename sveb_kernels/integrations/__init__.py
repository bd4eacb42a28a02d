"""Trainer integrations: thin adapters from LLM RL trainers to `sveb_kernels.estimators` and the ops
(docs/CONTRACT.md §5). One module per trainer; each imports its trainer only when it is imported
itself, so `import sveb_kernels` never pulls in a trainer.

    sveb_kernels.integrations.trl     SvebGRPOTrainer: trl.GRPOTrainer with token-level Hista /
                                      Numca / custom advantages      (pip install "sveb_kernels[trl]")
    sveb_kernels.integrations.verl    a `verl.plugins` entry point: algorithm.adv_estimator =
                                      sveb_gae | sveb_numca | sveb_hista   (pip install "sveb_kernels[verl]")
"""
