"""verl integration: fused GAE, Numca and Hista as verl advantage estimators (docs/CONTRACT.md §5).

Installed as a `verl.plugins` entry point (extra `sveb_kernels[verl]`), so `import verl` imports this
package in every verl process. A user then selects, in the ordinary config,

    algorithm.adv_estimator=sveb_gae | sveb_numca | sveb_hista
    +algorithm.sveb.backend=auto            # options live under the one key `algorithm.sveb`

- `sveb_gae`: verl's own GAE (same advantages and returns as verl's `compute_gae_advantage_return`,
  then verl's whitening), computed by the fused scan `sveb_kernels.gae`. Needs verl's critic.
- `sveb_numca`: Numca values from the `responses` token ids and the actor's tokenizer (verl's v1
  trainer's; elsewhere `+algorithm.sveb.tokenizer` or `set_tokenizer`), then per-token advantages
  R - V (or GAE over V, `algorithm.sveb.mode=gae`), scaled as verl's GRPO scales
  (`algorithm.norm_adv_by_std_in_grpo`; an all-equal group gets 0; see
  `sveb_kernels.estimators.advantages`).
- `sveb_hista`: Hista values computed in the actor workers' log-prob forward (a hook on the chosen
  layer of verl's FSDP engine; the hidden states never leave the workers; a prompt's rollouts may
  sit on different data-parallel ranks), stored as the rollouts' `values`, then advantages as above.
- Metrics `sveb/value/*`, `sveb/advantage/*` are added to verl's step metrics (v1 trainer).

Where the code runs, one module each: `options` (the `algorithm.sveb` config, both sides),
`driver` (the advantage step and the driver-side wraps), `workers` (Hista in the actor workers),
`patching` (the table of every verl touchpoint and the one `install`). The touchpoints
(`patching.TOUCHPOINTS`; each checked when its module is imported, for the parameters its wrapper
reads and the verl symbols it calls, and disabled on its own, with a RuntimeWarning, if not):

    registry                     core_algos.register_adv_est / ADV_ESTIMATOR_REGISTRY   driver   all
    compute_advantage            ray_trainer.compute_advantage (+ core_algos.compute_pf_ppo_reweight_data, optional)
                                                                                         driver   all
    v1_compute_advantage         v1.trainer_base.PPOTrainer._compute_advantage (+ trainer_base.tq,
                                 verl.DataProto, workers.utils.padding.response_to_nested)  driver   numca
    v1_compute_old_log_prob      v1.trainer_base.PPOTrainer._compute_old_log_prob       driver   hista
    engine_infer_batch           workers.engine.base.BaseEngine.infer_batch              workers  hista
    fsdp_prepare_model_outputs   workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead.prepare_model_outputs
                                 (+ FSDPEngine._gather_and_unpad_packed)                 workers  hista

Data it reads and writes: batch keys `token_level_rewards`, `token_level_scores`, `response_mask`,
`values`, `responses`, `attention_mask`, non-tensor `uid`; outputs `advantages`, `returns`; in the
v1 trainer's queue `uid`, `response_mask`, `responses`, `rm_scores` (read) and `values` (written);
in the workers' batch `input_ids` (nested), `response_mask`, `rm_scores`, `uid`, the non-tensor
`use_remove_padding` and the engine's `pad_size` output argument.
"""

from __future__ import annotations

import logging

try:
    from .options import CONFIG_KEY, ESTIMATORS, HistaOptions, NumcaOptions, Options, hista_request
    from .driver import (
        compute_sveb_advantage,
        group_index_from_uid,
        numca_values_for_batch,
        put_numca_values_v1,
        set_tokenizer,
        wrap_compute_advantage,
        wrap_v1_compute_advantage,
        wrap_v1_compute_old_log_prob,
    )
    from .workers import (
        HISTA_REQUEST_KEY,
        HiddenStateCapture,
        hista_values_for_rollouts,
        hista_values_on_worker,
        micro_batch_response_states,
        packed_response_hidden_states,
        response_hidden_states,
        wrap_engine_infer_batch,
        wrap_prepare_model_outputs,
    )
    from .patching import STATE, TESTED_VERL, TOUCHPOINTS, install, unavailable

    install()
except Exception:
    # verl imports plugins inside `try: ... except: logger.debug(...)`: without this a broken
    # plugin would be silent and the sveb names merely "unknown".
    logging.getLogger(__name__).warning("sveb_kernels' verl plugin failed to load; algorithm.adv_estimator="
                                        "sveb_* is unavailable", exc_info=True)
    raise

__all__ = [
    "CONFIG_KEY", "ESTIMATORS", "HISTA_REQUEST_KEY", "HiddenStateCapture", "HistaOptions", "NumcaOptions", "Options",
    "STATE", "TESTED_VERL", "TOUCHPOINTS", "compute_sveb_advantage", "group_index_from_uid", "hista_request",
    "hista_values_for_rollouts", "hista_values_on_worker", "install", "micro_batch_response_states",
    "numca_values_for_batch", "packed_response_hidden_states", "put_numca_values_v1", "response_hidden_states",
    "set_tokenizer", "unavailable", "wrap_compute_advantage", "wrap_engine_infer_batch",
    "wrap_prepare_model_outputs", "wrap_v1_compute_advantage", "wrap_v1_compute_old_log_prob",
]
