"""The verl plugin against the real verl (0.9.x) on CPU: entry point, the patch points, sveb_gae
against verl's own GAE, options, the Hista hidden-state hook on a tiny local model, and sveb_hista
inside verl's own actor-engine forward on gloo ranks."""

import inspect
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="needs the verl extra: pip install 'sveb_kernels[verl]'")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # verl warns about engines (megatron, NPU) absent on a CPU machine
    import verl
    from verl import DataProto
    from verl.trainer.ppo import core_algos, ray_trainer

from sveb_kernels.integrations import verl as plugin
from sveb_kernels.integrations.verl import patching
from sveb_kernels.integrations.verl.options import options_from_request


def random_mask(batch, length, generator):
    """Right-padded responses with holes (masked observation tokens inside a multi-turn response)."""
    lengths = torch.randint(0, length + 1, (batch,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    mask &= torch.rand(batch, length, generator=generator) > 0.2
    mask[0, :2] = True  # verl's whitening needs at least two valid tokens in the batch
    return mask.to(torch.float32)  # verl keeps response_mask as a float/int tensor


def make_data(batch, length, generator, *, group=4):
    mask = random_mask(batch, length, generator)
    rewards = torch.randn(batch, length, generator=generator) * mask
    values = torch.randn(batch, length, generator=generator)
    uid = np.array([f"prompt-{i // group}" for i in range(batch)], dtype=object)
    return DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "values": values, "response_mask": mask},
        non_tensors={"uid": uid},
    )


# ---------------------------------------------------------------------------- loading and patching
def test_entry_point_is_loaded_by_import_verl():
    # A fresh interpreter: `import verl` alone must import the plugin and, once verl's trainer module
    # is imported, the patch must be in place.
    code = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "import verl\n"
        "assert 'sveb_kernels.integrations.verl' in sys.modules, 'plugin not loaded by import verl'\n"
        "assert 'verl.trainer.ppo.ray_trainer' not in sys.modules, 'plugin imported the trainer eagerly'\n"
        "from verl.trainer.ppo.ray_trainer import compute_advantage\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "assert compute_advantage.__sveb_original__ is not None\n"
        "get_adv_estimator_fn('sveb_numca')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS="auto")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_entry_point_declared():
    from importlib.metadata import entry_points

    points = [p for p in entry_points(group="verl.plugins") if p.value == "sveb_kernels.integrations.verl"]
    assert points, "sveb_kernels is not installed with its verl.plugins entry point (pip install -e .)"


def test_patched_function_has_what_its_wrapper_reads():
    # If a verl upgrade removes or renames a parameter the wrapper reads, this fails (and the
    # plugin leaves that one touchpoint alone, warning, rather than wrapping a function it does not know).
    patched = ray_trainer.compute_advantage
    original = patched.__sveb_original__
    assert original.__module__ == "verl.trainer.ppo.ray_trainer"
    point = next(t for t in plugin.TOUCHPOINTS if t.name == "compute_advantage")
    assert patching.missing_parameters(original, point.needs) is None
    assert inspect.signature(patched) == inspect.signature(original)
    for name in plugin.ESTIMATORS:
        assert name in core_algos.ADV_ESTIMATOR_REGISTRY
    assert "index" in inspect.signature(core_algos.compute_grpo_outcome_advantage).parameters
    assert tuple(inspect.signature(core_algos.compute_pf_ppo_reweight_data).parameters)[:3] == (
        "data", "reweight_method", "weight_pow")


def test_every_touchpoint_is_patched_and_checked():
    """The whole table: each touchpoint's module imports, its target is wrapped (or, for the
    registry, the names are registered), the signature seen by callers is verl's, and every verl
    symbol a wrapper uses exists."""
    import importlib

    for point in plugin.TOUCHPOINTS:
        module = importlib.import_module(point.module)
        for symbol in point.symbols + point.optional:
            assert patching.missing_symbol(symbol) is None, symbol
        if point.kind == "register":
            continue
        wrapped = patching._resolve(module, point.target)
        original = wrapped.__sveb_original__
        assert patching.missing_parameters(original, point.needs) is None
        assert inspect.signature(wrapped) == inspect.signature(original)
    assert plugin.STATE.errors == {}
    assert {p.name for p in plugin.TOUCHPOINTS} == {
        "registry", "compute_advantage", "v1_compute_advantage", "v1_compute_old_log_prob", "engine_infer_batch",
        "fsdp_prepare_model_outputs"}


def test_patching_is_idempotent_and_tolerates_a_new_keyword(seed):
    """A simulated verl 0.9.2 whose compute_advantage gains a keyword: still patched, the keyword
    reaches verl's function for verl's own estimators, and the sveb names work."""
    patched = ray_trainer.compute_advantage
    plugin.install()
    assert ray_trainer.compute_advantage is patched
    from types import ModuleType

    seen = []

    def compute_advantage(data, adv_estimator, gamma=1.0, lam=1.0, num_repeat=1, norm_adv_by_std_in_grpo=True,
                          config=None, rollout_weights=None):
        seen.append(rollout_weights)
        return data

    module = ModuleType(patching.RAY_TRAINER_MODULE)
    module.compute_advantage = compute_advantage
    point = next(t for t in plugin.TOUCHPOINTS if t.name == "compute_advantage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patching.apply(point, module) is None
    assert module.compute_advantage.__sveb_original__ is compute_advantage
    module.compute_advantage("data", "grpo", rollout_weights="w")
    assert seen == ["w"]
    data = make_data(8, 12, torch.Generator().manual_seed(seed))
    out = module.compute_advantage(data, "sveb_hista", 1.0, 1.0, 1, False, {}, rollout_weights="w")
    mask = data.batch["response_mask"].bool()
    assert torch.isfinite(out.batch["advantages"]).all() and (out.batch["advantages"][~mask] == 0).all()


def test_a_changed_signature_disables_only_its_touchpoint():
    """A compute_advantage without a parameter the wrapper reads: that touchpoint is not patched
    (one RuntimeWarning), the sveb names raise its reason, the other touchpoints stay patched."""
    from types import ModuleType

    def compute_advantage(data, adv_estimator, gamma=1.0, config=None):
        return data

    module = ModuleType(patching.RAY_TRAINER_MODULE)
    module.compute_advantage = compute_advantage
    before = dict(plugin.STATE.errors)
    try:
        with pytest.warns(RuntimeWarning, match="compute_advantage not patched") as record:
            patching._patch_module(module)
        assert len(record) == 1 and "lam, norm_adv_by_std_in_grpo" in str(record[0].message)
        assert module.compute_advantage is compute_advantage  # left alone
        assert "lam" in plugin.unavailable("sveb_gae") and plugin.unavailable("sveb_numca")
        with pytest.raises(RuntimeError, match="has no parameter"):
            core_algos.get_adv_estimator_fn("sveb_gae")(token_level_rewards=None)
        from verl.trainer.ppo.v1 import trainer_base

        assert trainer_base.PPOTrainer._compute_old_log_prob.__sveb_original__ is not None  # untouched
    finally:
        plugin.STATE.errors.clear()
        plugin.STATE.errors.update(before)


def test_a_missing_verl_symbol_is_found_at_patch_time(monkeypatch):
    """The v1 Numca wrap uses the trainer module's TransferQueue client `tq`: checked when the
    module is patched, not found missing in the middle of a run."""
    from types import ModuleType

    class PPOTrainer:
        def _compute_advantage(self, batch, metrics):
            return batch

    module = ModuleType(patching.V1_MODULE)
    module.PPOTrainer = PPOTrainer
    point = next(t for t in plugin.TOUCHPOINTS if t.name == "v1_compute_advantage")
    monkeypatch.setitem(sys.modules, patching.V1_MODULE, module)
    problem = patching.apply(point, module)
    assert "tq" in problem and "not found" in problem
    assert not hasattr(PPOTrainer._compute_advantage, "__sveb_original__")


def test_version_outside_the_tested_range_warns_once(monkeypatch):
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    monkeypatch.setattr(plugin.STATE, "version_checked", False)
    with pytest.warns(RuntimeWarning, match="tested with verl >=0.9,<0.10, found 0.10.0"):
        patching.check_verl_version()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patching.check_verl_version() is None


def test_a_plugin_that_fails_to_import_logs_a_warning():
    # verl logs plugin import errors at DEBUG; the plugin logs its own failure at WARNING.
    code = (
        "import logging, sys, warnings; warnings.simplefilter('ignore'); logging.basicConfig(level=logging.WARNING)\n"
        "sys.modules['sveb_kernels.integrations.verl.workers'] = None  # a broken plugin module\n"
        "import verl\n"
        "assert 'sveb_kernels.integrations.verl' not in sys.modules\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VERL_USE_EXTERNAL_PLUGINS="auto")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
    assert "WARNING:sveb_kernels.integrations.verl:sveb_kernels' verl plugin failed to load" in run.stderr


def test_registry_lookup_explains_itself():
    fn = core_algos.get_adv_estimator_fn("sveb_numca")
    with pytest.raises(RuntimeError, match="compute_advantage"):
        fn(token_level_rewards=torch.zeros(1, 1), response_mask=torch.ones(1, 1), config=None)


def test_v1_trainer_gets_the_patched_function():
    pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs TransferQueue")
    from verl.trainer.ppo.v1 import utils as v1_utils

    assert v1_utils.compute_advantage is ray_trainer.compute_advantage
    generator = torch.Generator().manual_seed(0)
    data = make_data(8, 33, generator)
    keys = [f"prompt-{i // 4}_0_0" for i in range(8)]
    out = v1_utils.compute_advantage_for_multi_trajectories(
        data, batch_keys=keys, adv_estimator="sveb_gae", gamma=0.9, lam=0.8, config={})
    want = plugin.compute_sveb_advantage(make_data_copy(data), "sveb_gae", gamma=0.9, lam=0.8)
    torch.testing.assert_close(out.batch["advantages"], want.batch["advantages"], rtol=0, atol=0)


def make_data_copy(data):
    return DataProto.from_dict(
        tensors={k: data.batch[k].clone() for k in ("token_level_rewards", "values", "response_mask")},
        non_tensors={"uid": data.non_tensor_batch["uid"].copy()},
    )


# -------------------------------------------------------------------------------------- sveb_gae
@pytest.mark.parametrize(
    "batch,length,gamma,lam",
    [(7, 1, 1.0, 1.0), (5, 37, 0.99, 0.95), (16, 301, 1.0, 1.0), (3, 1023, 0.7, 0.0), (4, 8192, 1.0, 0.95)],
)
def test_sveb_gae_equals_verls_gae(seed, batch, length, gamma, lam):
    generator = torch.Generator().manual_seed(seed)
    data = make_data(batch, length, generator)
    if length == 1:
        data.batch["response_mask"][:] = 1.0
    reference = make_data_copy(data)
    want_adv, want_ret = core_algos.compute_gae_advantage_return(
        token_level_rewards=reference.batch["token_level_rewards"], values=reference.batch["values"],
        response_mask=reference.batch["response_mask"], gamma=gamma, lam=lam)

    inputs = {k: data.batch[k].clone() for k in data.batch.keys()}
    out = ray_trainer.compute_advantage(data, adv_estimator="sveb_gae", gamma=gamma, lam=lam, config={})
    for k, v in inputs.items():
        assert torch.equal(out.batch[k], v), f"{k} was modified"
    adv, ret = out.batch["advantages"], out.batch["returns"]
    assert adv.shape == ret.shape == (batch, length) and adv.dtype == ret.dtype == torch.float32

    # Both are float32 computations of the same recurrence: the scan's error bound (docs/CONTRACT.md
    # §3) twice, on the raw advantages, and divided by the whitening scale after whitening.
    raw = want_ret - reference.batch["values"]
    bound = 2e-5 * (1 + float(raw.abs().max())) * math.log2(length + 1)
    assert float((ret - want_ret).abs().max()) <= bound + 1e-6 * float(want_ret.abs().max())
    mask = reference.batch["response_mask"].bool()
    scale = float(raw[mask].std()) if int(mask.sum()) > 1 else 1.0
    assert float((adv - want_adv).abs().max()) <= 2 * bound / scale + 1e-5 * (1 + float(want_adv.abs().max()))


def test_sveb_gae_accepts_the_estimator_enum_and_a_verl_algo_config(seed):
    from verl.trainer.config import AlgoConfig

    generator = torch.Generator().manual_seed(seed)
    data = make_data(6, 50, generator)
    config = AlgoConfig(gamma=0.9, lam=0.9, adv_estimator="sveb_gae")
    out = ray_trainer.compute_advantage(data, adv_estimator=config.adv_estimator, gamma=0.9, lam=0.9, config=config)
    assert torch.isfinite(out.batch["advantages"]).all()


def test_sveb_gae_without_values_names_the_critic(seed):
    data = make_data(4, 9, torch.Generator().manual_seed(seed))
    data.batch.pop("values")
    with pytest.raises(ValueError, match="critic"):
        ray_trainer.compute_advantage(data, adv_estimator="sveb_gae", config={})


def test_other_estimators_pass_through_unchanged(seed):
    generator = torch.Generator().manual_seed(seed)
    data = make_data(8, 20, generator)
    reference = make_data_copy(data)
    out = ray_trainer.compute_advantage(data, adv_estimator="grpo", config={})
    want = ray_trainer.compute_advantage.__sveb_original__(reference, adv_estimator="grpo", config={})
    assert torch.equal(out.batch["advantages"], want.batch["advantages"])


# --------------------------------------------------------------------------------------- options
def test_options_from_config():
    from omegaconf import OmegaConf

    config = OmegaConf.create({"gamma": 1.0, "sveb": {"backend": "reference", "mode": "gae",
                                                      "numca": {"match": "prefix"}, "hista": {"layer": 3}}})
    options = plugin.Options.from_config(config)
    assert options.backend == "reference" and options.mode == "gae"
    assert options.numca.match == "prefix" and options.numca.leave_one_out is True
    assert options.hista.layer == 3 and options.hista.temperature == 0.1
    assert plugin.Options.from_config(None) == plugin.Options()
    assert plugin.Options.from_config({}) == plugin.Options()
    with pytest.raises(ValueError, match="algorithm.sveb.numca.matchh"):
        plugin.Options.from_config({"sveb": {"numca": {"matchh": "last"}}})
    with pytest.raises(ValueError, match="algorithm.sveb.mode"):
        plugin.Options.from_config({"sveb": {"mode": "td"}})
    with pytest.raises(TypeError, match="algorithm.sveb"):
        plugin.Options.from_config({"sveb": 3})


def test_backend_option_reaches_gae(seed):
    data = make_data(4, 9, torch.Generator().manual_seed(seed))
    with pytest.raises((ValueError, RuntimeError), match="no-such-backend"):
        ray_trainer.compute_advantage(data, adv_estimator="sveb_gae", config={"sveb": {"backend": "no-such-backend"}})


# ------------------------------------------------------------------------------------ sveb_numca
def numeric_responses(tokenizer, rollouts, length, generator):
    """Responses that write numbers (some shared between rollouts of a prompt), right-padded."""
    ids, mask = torch.full((rollouts, length), tokenizer.pad_token_id), torch.zeros(rollouts, length)
    for b in range(rollouts):
        numbers = torch.randint(0, 6, (3,), generator=generator).tolist()
        text = "Compute " + " + ".join(str(10 + n) for n in numbers) + " = " + str(30 + numbers[0])
        row = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        row = row[: int(torch.randint(len(row) // 2, len(row) + 1, (), generator=generator))]
        ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return ids, mask


def numca_data(seed, batch=12, length=24, group=4):
    from sveb_kernels.sveb import tiny

    generator = torch.Generator().manual_seed(seed)
    tokenizer = tiny.build_tokenizer()
    responses, mask = numeric_responses(tokenizer, batch, length, generator)
    scores = torch.randint(0, 2, (batch,), generator=generator).float()
    rewards = torch.zeros(batch, length)
    last = (mask.sum(1).long() - 1).clamp_min(0)
    rewards[torch.arange(batch), last] = scores * (mask.sum(1) > 0)
    uid = np.array([f"p{(b // group) * 7 % 5}" for b in range(batch)], dtype=object)
    data = DataProto.from_dict(
        tensors={"responses": responses, "response_mask": mask, "token_level_rewards": rewards},
        non_tensors={"uid": uid})
    return data, tokenizer, scores


@pytest.mark.parametrize("match,leave_one_out", [("last", True), ("prefix", False)])
def test_sveb_numca_equals_a_direct_call_of_the_ops(seed, match, leave_one_out):
    import sveb_kernels as sk

    data, tokenizer, scores = numca_data(seed)
    plugin.set_tokenizer(tokenizer)
    mask = data.batch["response_mask"].bool()
    config = {"sveb": {"numca": {"match": match, "leave_one_out": leave_one_out}}}
    out = ray_trainer.compute_advantage(data, adv_estimator="sveb_numca", config=config)

    # The ops directly: the value after token t-1 is the value of the state before token t; before
    # the first token, the peers' mean return.
    _, group = np.unique(data.non_tensor_batch["uid"].astype(str), return_inverse=True)
    group = torch.as_tensor(group)
    spans = sk.numeric_spans(data.batch["responses"], sk.NumericVocab.from_tokenizer(tokenizer), mask=mask)
    after = sk.numca_values(spans, scores, group, mask, match=match, leave_one_out=leave_one_out).double()
    peers = torch.tensor([
        [scores[c].double().mean() if (c := [j for j in range(len(group)) if group[j] == group[b]
                                             and (j != b or not leave_one_out)]) else 0.0][0]
        for b in range(len(group))])
    before = torch.cat([peers[:, None], after[:, :-1]], dim=1)
    # verl's GRPO convention (norm_adv_by_std_in_grpo=True): divided by the group's std + 1e-6; a
    # group whose scores are all equal has no signal (outcome reward: reward-to-go = R everywhere)
    stds = torch.stack([scores[group == group[b]].double().std() for b in range(len(group))])
    flat = torch.tensor([scores[group == group[b]].unique().numel() == 1 for b in range(len(group))])
    want = torch.where(flat[:, None], 0.0, (scores.double()[:, None] - before) / (stds[:, None] + 1e-6))
    assert torch.allclose(out.batch["advantages"].double()[mask], want[mask], atol=1e-5)
    assert (out.batch["advantages"][~mask] == 0).all()
    assert torch.allclose(out.batch["returns"][mask].double(), scores.double()[:, None].expand_as(mask)[mask], atol=1e-6)


@pytest.mark.parametrize("estimator", ["sveb_numca", "sveb_hista"])
@pytest.mark.parametrize("mode,gamma,lam", [("r_minus_v", 1.0, 1.0), ("gae", 0.9, 0.95), ("gae", 0.99, 1.0)])
@pytest.mark.parametrize("norm_by_std", [True, False])
@pytest.mark.parametrize("whiten", [False, True])
def test_constant_scores_give_no_signal_as_verls_grpo(seed, estimator, mode, gamma, lam, norm_by_std, whiten):
    """verl's GRPO gives an all-equal group 0; the old default (whiten over the batch) gave a constant
    -0.114 and GAE with gamma < 1 a drift divided by a zero std."""
    data, tokenizer, _ = numca_data(seed)
    plugin.set_tokenizer(tokenizer)
    mask = data.batch["response_mask"]
    last = (mask.sum(1).long() - 1).clamp_min(0)
    rewards = torch.zeros_like(mask)
    rewards[torch.arange(len(mask)), last] = 1.0 * (mask.sum(1) > 0)
    data.batch["token_level_rewards"] = rewards
    data.batch["values"] = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) * mask
    reference = ray_trainer.compute_advantage(make_numca_copy(data), adv_estimator="grpo",
                                              norm_adv_by_std_in_grpo=norm_by_std, config={})
    assert torch.equal(reference.batch["advantages"], torch.zeros_like(mask))
    out = ray_trainer.compute_advantage(data, adv_estimator=estimator, gamma=gamma, lam=lam,
                                        norm_adv_by_std_in_grpo=norm_by_std,
                                        config={"sveb": {"mode": mode, "whiten": whiten}})
    assert torch.equal(out.batch["advantages"], torch.zeros_like(mask))


def test_sveb_numca_gae_mode_with_unit_gamma_lam_is_r_minus_v(seed):
    data, tokenizer, _ = numca_data(seed)
    plugin.set_tokenizer(tokenizer)
    first = ray_trainer.compute_advantage(make_numca_copy(data), adv_estimator="sveb_numca", config={})
    second = ray_trainer.compute_advantage(data, adv_estimator="sveb_numca", gamma=1.0, lam=1.0,
                                           config={"sveb": {"mode": "gae"}})
    torch.testing.assert_close(first.batch["advantages"], second.batch["advantages"], atol=1e-5, rtol=0)


def make_numca_copy(data):
    return DataProto.from_dict(tensors={k: data.batch[k].clone() for k in data.batch.keys()},
                               non_tensors={"uid": data.non_tensor_batch["uid"].copy()})


def test_sveb_numca_names_what_is_missing(seed):
    data, tokenizer, _ = numca_data(seed)
    plugin.set_tokenizer(None)
    with pytest.raises(ValueError, match="tokenizer"):
        ray_trainer.compute_advantage(make_numca_copy(data), adv_estimator="sveb_numca", config={})
    plugin.set_tokenizer(tokenizer)
    data.non_tensor_batch.pop("uid")
    with pytest.raises(ValueError, match="uid"):
        ray_trainer.compute_advantage(data, adv_estimator="sveb_numca", config={})


# ------------------------------------------------------------------------------- Hista on workers
@pytest.fixture(scope="module")
def tiny_model():
    from sveb_kernels.sveb import tiny

    tokenizer = tiny.build_tokenizer()
    return tiny.build_model(tokenizer, layers=3, hidden_size=32), tokenizer


def padded_rollouts(model, generator, batch=6, prompt=7, response=9):
    """verl's layout: left-padded prompts, right-padded responses, one attention mask."""
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (batch, prompt + response), generator=generator)
    attention = torch.ones(batch, prompt + response, dtype=torch.long)
    for b in range(batch):
        attention[b, : int(torch.randint(0, prompt - 1, (), generator=generator))] = 0
        attention[b, prompt + int(torch.randint(1, response + 1, (), generator=generator)):] = 0
    position_ids = (attention.cumsum(1) - 1).clamp_min(0)
    return input_ids, attention, position_ids


@pytest.mark.parametrize("layer", [0, 1, 2, 3, -1, -2])
def test_capture_equals_output_hidden_states(seed, tiny_model, layer):
    model, _ = tiny_model
    input_ids, attention, position_ids = padded_rollouts(model, torch.Generator().manual_seed(seed))
    def hooks():  # transformers installs hooks of its own; layer 0 is read by a pre-hook
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                     output_hidden_states=True).hidden_states[layer]
        before = hooks()  # transformers adds its recorders on the first forward that asks for states
        with plugin.HiddenStateCapture(model, layer=layer) as capture:
            assert hooks() == before + 1
            model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids)
    assert torch.equal(capture.hidden, want)
    assert hooks() == before, "the hook must be removed on exit"


def test_response_states_are_the_states_before_each_response_token(seed, tiny_model):
    model, _ = tiny_model
    prompt, response = 7, 9
    input_ids, attention, position_ids = padded_rollouts(model, torch.Generator().manual_seed(seed), prompt=prompt,
                                                         response=response)
    with torch.no_grad(), plugin.HiddenStateCapture(model, layer=-1) as capture:
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids)
    states = plugin.response_hidden_states(capture.hidden, response)
    # The state before response token t is the one whose logits give that token's log-prob.
    torch.testing.assert_close(model.lm_head(states), out.logits[:, -response - 1 : -1], rtol=0, atol=0)
    for b in range(input_ids.shape[0]):
        for t in range(response):
            assert torch.equal(states[b, t], capture.hidden[b, prompt + t - 1])


def test_packed_response_states(seed, tiny_model):
    # verl's remove-padding forward: all sequences in one row, positions restarting per sequence.
    model, _ = tiny_model
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, 6, (5,), generator=generator)
    responses = torch.randint(0, 7, (5,), generator=generator)
    lengths = prompts + responses
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    input_ids = torch.randint(0, model.config.vocab_size, (1, int(lengths.sum())), generator=generator)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    with torch.no_grad():
        want = model(input_ids=input_ids, position_ids=position_ids, output_hidden_states=True).hidden_states[2]
        with plugin.HiddenStateCapture(model, layer=2) as capture:
            model(input_ids=input_ids, position_ids=position_ids)
    assert torch.equal(capture.hidden, want)
    got = plugin.packed_response_hidden_states(capture.hidden, cu_seqlens, responses)
    rows = [want[0, int(cu_seqlens[i] + prompts[i] + t - 1)] for i in range(5) for t in range(int(responses[i]))]
    assert got.shape == (int(responses.sum()), want.shape[-1])
    if rows:
        assert torch.equal(got, torch.stack(rows))
    with pytest.raises(ValueError, match="response_lengths"):
        plugin.packed_response_hidden_states(capture.hidden, cu_seqlens, lengths)


def test_capture_rejects_a_layer_out_of_range(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError, match="layer must be an int in"):
        plugin.HiddenStateCapture(model, layer=4)
    with pytest.raises(TypeError, match="layer"):
        plugin.HiddenStateCapture(model, layer="last")


def test_sveb_hista_from_worker_values_equals_the_op(seed, tiny_model):
    import sveb_kernels as sk

    model, _ = tiny_model
    response = 9
    input_ids, attention, position_ids = padded_rollouts(model, torch.Generator().manual_seed(seed), batch=8,
                                                         response=response)
    mask = attention[:, -response:].float()
    scores = torch.randn(8)
    uid = np.array([f"q{b % 2}" for b in range(8)], dtype=object)  # groups interleaved in the batch
    # Worker side: the hook in the log-prob forward, values computed there.
    with torch.no_grad(), plugin.HiddenStateCapture(model, layer=-2) as capture:
        model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids)
    states = plugin.response_hidden_states(capture.hidden, response)
    values = plugin.hista_values_for_rollouts(states, scores, mask, uid, plugin.Options())

    # The op directly on the states before each response token, packed by hand.
    valid = mask.bool()
    group = torch.tensor([b % 2 for b in range(8)])
    rows = [(b, t) for g in range(2) for b in range(8) if group[b] == g for t in range(response) if valid[b, t]]
    hidden = torch.stack([states[b, t] for b, t in rows])
    rollout_ids = torch.tensor([b for b, _ in rows], dtype=torch.int32)
    offsets = torch.tensor([0, sum(1 for b, _ in rows if group[b] == 0), len(rows)])
    want = sk.hista_values(hidden, scores[rollout_ids.long()], rollout_ids, offsets, temperature=0.1).values
    got = torch.stack([values[b, t] for b, t in rows])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (values[~valid] == 0).all()

    # Driver side: the values travel as the batch's `values`; sveb_hista turns them into R - V.
    rewards = torch.zeros(8, response)
    last = (mask.sum(1).long() - 1).clamp_min(0)
    rewards[torch.arange(8), last] = scores
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask, "values": values},
                               non_tensors={"uid": uid})
    out = ray_trainer.compute_advantage(data, adv_estimator="sveb_hista", norm_adv_by_std_in_grpo=False, config={})
    torch.testing.assert_close(out.batch["advantages"][valid], (scores[:, None] - values)[valid], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- sveb_numca in verl's v1 trainer
class FakeQueue:
    """The part of TransferQueue's client verl's v1 advantage step uses, in memory: per-sample
    fields, returned as jagged nested tensors (strings as a NonTensorStack); a field a sample lacks
    is left out, as the v1 trainer expects for `values` without a critic."""

    class Meta:
        def __init__(self, keys, partition_id):
            self.keys, self.partition_id = keys, partition_id

        def __len__(self):
            return len(self.keys)

    def __init__(self):
        self.rows = {}

    def kv_batch_get(self, keys, partition_id, select_fields):
        from tensordict import NonTensorStack, TensorDict

        out = {}
        for name in select_fields:
            column = [self.rows[(partition_id, k)].get(name) for k in keys]
            if any(v is None for v in column):
                continue
            out[name] = (NonTensorStack.from_list(column) if isinstance(column[0], str)
                         else torch.nested.as_nested_tensor(column, layout=torch.jagged))
        return TensorDict(out, batch_size=len(keys))

    def kv_batch_put(self, keys, partition_id, fields):
        for name in fields.keys():
            for key, value in zip(keys, fields[name].unbind()):
                self.rows.setdefault((partition_id, key), {})[name] = value
        return self.Meta(keys, partition_id)


def test_sveb_numca_in_the_v1_trainer_equals_the_function_level_path(seed, monkeypatch):
    pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs TransferQueue")
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from verl.trainer.ppo.v1 import trainer_base

    method = trainer_base.PPOTrainer._compute_advantage
    assert method.__sveb_original__ is not None

    data, tokenizer, _ = numca_data(seed)
    plugin.set_tokenizer(tokenizer)
    queue = FakeQueue()
    keys = [f"k{i}" for i in range(len(data))]
    lengths = data.batch["response_mask"].sum(1).long()
    for i, key in enumerate(keys):
        n = int(lengths[i])
        queue.rows[("train", key)] = {
            "uid": str(data.non_tensor_batch["uid"][i]), "response_mask": data.batch["response_mask"][i, :n],
            "responses": data.batch["responses"][i, :n], "rm_scores": data.batch["token_level_rewards"][i, :n]}
    monkeypatch.setattr(trainer_base, "tq", queue)
    config = OmegaConf.create({
        "algorithm": {"adv_estimator": "sveb_numca", "gamma": 1.0, "lam": 1.0, "use_kl_in_reward": False,
                      "norm_adv_by_std_in_grpo": True, "sveb": {"numca": {"match": "prefix"}}},
        "actor_rollout_ref": {"rollout": {"n": 4}}})
    plugin.set_tokenizer(None)  # the actor's tokenizer is the default
    trainer = SimpleNamespace(config=config, use_critic=False, tokenizer=tokenizer)
    metrics = {}
    method(trainer, FakeQueue.Meta(keys, "train"), metrics)
    plugin.set_tokenizer(tokenizer)

    want = ray_trainer.compute_advantage(make_numca_copy(data), adv_estimator="sveb_numca",
                                         config={"sveb": {"numca": {"match": "prefix"}}})
    for i, key in enumerate(keys):
        n = int(lengths[i])
        got = queue.rows[("train", key)]
        torch.testing.assert_close(got["advantages"], want.batch["advantages"][i, :n], rtol=0, atol=1e-6)
        torch.testing.assert_close(got["returns"], want.batch["returns"][i, :n], rtol=0, atol=1e-6)
    # sveb/* metrics, as the TRL integration logs them (verl logs values only with a critic)
    mask = want.batch["response_mask"].bool()
    assert metrics["sveb/advantage/max"] == pytest.approx(float(want.batch["advantages"][mask].max()), abs=1e-6)
    assert {"sveb/value/mean", "sveb/value/std", "sveb/advantage/mean", "sveb/advantage/min"} <= set(metrics)

    with pytest.raises(ValueError, match="critic.enable=False"):
        method(SimpleNamespace(config=config, use_critic=True), FakeQueue.Meta(keys, "train"), {})


# ----------------------------------------------------------------------------- the GPU recipe's config
def recipe_overrides(estimator):
    """The Hydra overrides examples/verl_gsm8k.sh passes to verl for `estimator`, as the shell would."""
    import pathlib
    import re
    import shlex

    script = (pathlib.Path(__file__).resolve().parent.parent / "examples" / "verl_gsm8k.sh").read_text()
    extras = {}
    for names, body in re.findall(r"^\s+([\w|]+)\)\s+EXTRA=\((.*?)\) ;;", script, re.M | re.S):
        for name in names.split("|"):
            extras[name] = shlex.split(body)
    block = script.split("# BEGIN verl overrides")[1].split("# END verl overrides")[0]
    words = shlex.split(block.split("\n", 1)[1].replace("\\\n", " "))
    assert words[:3] == ["python3", "-m", "verl.trainer.main_ppo"], words[:3]
    variables = {"$DATA": "/data/gsm8k", "$MODEL": "Qwen/Qwen2.5-0.5B-Instruct", "$GPUS": "1", "$STEPS": "20",
                 "$ESTIMATOR": estimator}
    out = []
    for word in words[3:]:
        if word == "${EXTRA[@]}":
            out.extend(w.replace("$MODEL", variables["$MODEL"]) for w in extras[estimator])
            continue
        for name, value in variables.items():
            word = word.replace(name, value)
        out.append(word)
    return out


@pytest.mark.parametrize("estimator", ["sveb_numca", "sveb_hista", "sveb_gae"])
def test_gpu_recipe_overrides_compose_with_verls_config(estimator):
    from hydra import compose, initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=recipe_overrides(estimator))
    assert config.algorithm.adv_estimator == estimator and config.trainer.use_v1
    options = plugin.Options.from_config(config.algorithm)
    if estimator == "sveb_numca":
        assert options.tokenizer == config.actor_rollout_ref.model.path
    elif estimator == "sveb_hista":
        assert options.hista == plugin.HistaOptions(layer=-1, temperature=0.1) and not config.critic.enable
        # The actor's log-prob forward runs (Hista's values are computed there).
        assert not config.algorithm.rollout_correction.bypass_mode
    else:
        assert config.critic.enable


def test_options_reject_a_scalar_where_a_section_belongs():
    with pytest.raises(TypeError, match="algorithm.sveb.numca must be a mapping"):
        plugin.Options.from_config({"sveb": {"numca": "prefix"}})


# ------------------------------------------------------ sveb_hista inside verl's actor workers (engine)
def _verl_on_cpu():
    """verl picks the CUDA platform on a CUDA build of torch even without a GPU; point the device
    helpers verl's engine path imported by name at the CPU."""
    import verl.utils.device as device

    cpu = {device.get_device_id: lambda: "cpu", device.get_device_name: lambda: "cpu"}
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("verl"):
            for name, value in list(vars(module).items()):
                if callable(value) and value in cpu:
                    setattr(module, name, cpu[value])


def _engine(model):
    """verl's own FSDP LM-head engine class, without FSDP: its forward path (micro-batching, dynamic
    batch reordering, padding removal, output post-processing) runs on the plain tiny model."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module, engine.use_ulysses_sp, engine.ulysses_device_mesh = model, False, None
    engine.ulysses_sequence_parallel_size, engine.pad_to_length = 1, False
    engine._autocast_dtype = torch.float32  # verl's mixed-precision setting; fp32 lets the test compare exactly
    return engine


def _rollouts(seed, vocab, rows=10, groups=3):
    """What verl's TransferQueue hands the actor: per-rollout nested prompt+response ids, the
    response mask and per-token scores, and the prompt ids (groups interleaved over the rows)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, 8, (rows,), generator=g).tolist()
    responses = torch.randint(1, 10, (rows,), generator=g).tolist()
    uid = [f"prompt-{int(i)}" for i in torch.randint(0, groups, (rows,), generator=g)]
    ids = [torch.randint(0, vocab, (p + r,), generator=g) for p, r in zip(prompts, responses)]
    scores = [torch.zeros(r).index_fill_(0, torch.tensor([r - 1]), float(torch.randn((), generator=g)))
              for r in responses]
    # Response masks with holes (a multi-turn response's tool output), the first token always kept.
    masks = [(torch.rand(r, generator=g) > 0.25).index_fill_(0, torch.tensor([0]), True) for r in responses]
    return prompts, responses, uid, ids, scores, masks


def _engine_batch(rows, prompts, responses, uid, ids, scores, masks, request, **settings):
    from tensordict import NonTensorStack, TensorDict
    from verl.utils import tensordict_utils as tu

    def nested(tensors):
        return torch.nested.as_nested_tensor(list(tensors), layout=torch.jagged)

    data = TensorDict({
        "input_ids": nested(ids[i] for i in rows),
        "position_ids": nested(torch.arange(len(ids[i])) for i in rows),
        "attention_mask": nested(torch.ones(len(ids[i]), dtype=torch.long) for i in rows),
        "response_mask": nested(masks[i].long() for i in rows),
        "loss_mask": nested(torch.cat([torch.zeros(prompts[i]), masks[i].float()]).long() for i in rows),
        "rm_scores": nested(scores[i] for i in rows),
    }, batch_size=[len(rows)])
    data["uid"] = NonTensorStack(*[uid[i] for i in rows])
    tu.assign_non_tensor(data, use_fused_kernels=False, calculate_entropy=False, compute_loss=False,
                         temperature=1.0, **settings)
    if request is not None:
        tu.assign_non_tensor(data, **{plugin.HISTA_REQUEST_KEY: request})
    return data


def _direct_values(model, layer, prompts, responses, uid, ids, scores, masks, options):
    """The oracle path: each rollout through the model alone with output_hidden_states, the states
    before its (unmasked) response tokens, then one direct sveb_kernels.hista_values over all
    rollouts; 0 at masked tokens."""
    import sveb_kernels as sk

    states = []
    with torch.no_grad():
        for i, x in enumerate(ids):
            hidden = model(input_ids=x[None], output_hidden_states=True).hidden_states[layer][0]
            states.append(hidden[prompts[i] - 1: prompts[i] + responses[i] - 1][masks[i]])
    kept = [int(m.sum()) for m in masks]
    order = sorted(range(len(ids)), key=lambda i: (uid[i], i))
    hidden = torch.cat([states[i] for i in order])
    rollout_ids = torch.tensor([i for i in order for _ in range(kept[i])], dtype=torch.int32)
    returns = torch.tensor([float(scores[i].sum()) for i in order for _ in range(kept[i])])
    sizes = [sum(kept[i] for i in order if uid[i] == u) for u in sorted(set(uid))]
    offsets = torch.tensor([0] + np.cumsum(sizes).tolist())
    temperature = options.hista.temperature
    if options.hista.similarity == "dot":
        temperature *= float(hidden.float().pow(2).sum(1).mean())
    values = sk.hista_values(hidden, returns, rollout_ids, offsets, temperature=temperature,
                             similarity=options.hista.similarity).values
    by_row = dict(zip(order, values.split([kept[i] for i in order])))
    return [torch.zeros(responses[i]).masked_scatter_(masks[i], by_row[i]) for i in range(len(ids))]


ENGINE_CASES = [  # (layer, similarity, verl's forward settings, engine attributes)
    # verl's default: padding removed (rollouts packed into one row), dynamic batch size (micro-batches
    # regrouped by length, the outputs restored to the batch's order); here with verl's static
    # padding of the packed row to a bucket boundary too.
    (-1, "cosine", dict(use_remove_padding=True, use_dynamic_bsz=True, max_token_len_per_gpu=24),
     dict(pad_to_length=True, pad_to_length_bucket=16)),
    # Padded forward, fixed micro-batch size.
    (1, "dot", dict(use_remove_padding=False, use_dynamic_bsz=False, micro_batch_size_per_gpu=5), {}),
]


def _engine_worker(rank, world, init_file, out_dir, seed):
    import datetime
    import json
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    log = []
    try:
        _verl_on_cpu()
        from sveb_kernels.sveb import tiny

        model = tiny.build_model(tiny.build_tokenizer(), seed=0, layers=3, hidden_size=32).eval()
        solo = [dist.new_group([r]) for r in range(world)][rank]
        for case, (layer, similarity, settings, attributes) in enumerate(ENGINE_CASES):
            options = plugin.Options(hista=plugin.HistaOptions(layer=layer, similarity=similarity))
            rollouts = _rollouts(seed + case, model.config.vocab_size)
            want = _direct_values(model, layer, *rollouts, options)
            request = plugin.hista_request(options)
            rows = len(want)
            # 1. This rank's share of the batch (a prompt's rollouts spread over ranks): the values
            #    are those of all ranks' rollouts together (sveb_kernels.distributed over verl's dp group).
            mine = list(range(rank, rows, world))
            engine = _engine(model)
            vars(engine).update(attributes)
            out = engine.infer_batch(_engine_batch(mine, *rollouts, request, **settings))
            got = out["model_output"]["values"].unbind()
            assert len(got) == len(mine)
            for i, v in zip(mine, got):
                torch.testing.assert_close(v, want[i], rtol=0, atol=2e-5)
            # 2. The whole batch on one rank (a one-rank dp group): the single-process op.
            if rank == 0:
                engine.get_data_parallel_group = lambda: solo
                out = engine.infer_batch(_engine_batch(list(range(rows)), *rollouts, request, **settings))
                for i, v in enumerate(out["model_output"]["values"].unbind()):
                    torch.testing.assert_close(v, want[i], rtol=0, atol=2e-5)
                # Without the request, verl's forward is untouched: no hook, no values.
                plain = engine.infer_batch(_engine_batch(list(range(rows)), *rollouts, None, **settings))
                assert set(plain["model_output"]) == {"log_probs"}
                torch.testing.assert_close(plain["model_output"]["log_probs"].values(),
                                           out["model_output"]["log_probs"].values(), rtol=0, atol=0)
            log.append(f"case {case}")
    except BaseException:
        log.append("FAILED " + traceback.format_exc())
        raise
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(log, f)
        dist.destroy_process_group()


def test_hista_values_in_verls_engine_forward_equal_the_op(tmp_path, seed):
    """verl's actor forward (its FSDP engine's infer_batch, micro-batching, dynamic batch order,
    padding removal or not) with the plugin's hook, on 2 gloo ranks with prompts split over them and
    on one rank with the whole batch, against each rollout run alone through the model and one
    direct `hista_values` call."""
    import json

    import torch.multiprocessing as mp

    world = 2
    try:
        mp.spawn(_engine_worker, args=(world, str(tmp_path / "init"), str(tmp_path), seed), nprocs=world, join=True)
    except Exception:
        failures = [line for rank in range(world) if (tmp_path / f"rank{rank}.json").exists()
                    for line in json.loads((tmp_path / f"rank{rank}.json").read_text()) if line.startswith("FAILED")]
        pytest.fail("\n\n".join(failures) or "a rank died without a log")
    for rank in range(world):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [f"case {c}" for c in range(len(ENGINE_CASES))]


def test_worker_patches_are_where_verls_worker_calls_them():
    from verl.workers.engine import base
    from verl.workers.engine.fsdp import transformer_impl

    assert plugin.STATE.errors == {}
    # The FSDP engine inherits the wrapped infer_batch, and verl's worker calls it by that name.
    assert transformer_impl.FSDPEngineWithLMHead.infer_batch is base.BaseEngine.infer_batch
    assert base.BaseEngine.infer_batch.__sveb_original__ is not None
    from verl.workers import engine_workers

    assert "self.engine.infer_batch(data, loss_function=loss_function)" in inspect.getsource(
        engine_workers.TrainingWorker.infer_batch)


def test_engine_wrap_tolerates_extra_parameters_and_refuses_missing_ones():
    from types import ModuleType

    module = ModuleType(patching.ENGINE_MODULE)

    class Engine:
        def infer_batch(self, data, loss_function=None, extra=None):  # a keyword verl might add
            return ("original", extra)

        def get_data_parallel_group(self):
            return None

    module.BaseEngine = Engine
    point = next(t for t in plugin.TOUCHPOINTS if t.name == "engine_infer_batch")
    symbols = point.symbols
    object.__setattr__(point, "symbols", ())  # the fake module is not importable by name
    try:
        assert patching.apply(point, module) is None
        assert Engine().infer_batch({}, extra=3) == ("original", 3)  # no Hista request: passed through

        class Old:
            def infer_batch(self, batch):  # `data` renamed
                return "original"

        module.BaseEngine = Old
        assert "has no parameter(s) data" in patching.apply(point, module)
        assert Old().infer_batch(None) == "original"  # left alone
        del module.BaseEngine
        assert "not found" in patching.apply(point, module)
    finally:
        object.__setattr__(point, "symbols", symbols)


def test_old_log_prob_step_carries_the_hista_request_for_that_call_only():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    seen = []

    def original(self, batch, metrics):
        seen.append(dict(batch.extra_info))
        return SimpleNamespace(extra_info=dict(batch.extra_info))  # a new batch meta, as verl returns

    wrapped = plugin.wrap_v1_compute_old_log_prob(original)
    config = OmegaConf.create({"algorithm": {"adv_estimator": "sveb_hista",
                                             "sveb": {"backend": "reference", "hista": {"layer": 2, "temperature": 0.5}}}})
    trainer = SimpleNamespace(config=config, use_critic=False)
    batch = SimpleNamespace(extra_info={"temperature": 1.0})
    out = wrapped(trainer, batch, {})
    assert seen[-1][plugin.HISTA_REQUEST_KEY] == {"layer": 2, "temperature": 0.5, "similarity": "cosine",
                                                   "backend": "reference"}
    assert plugin.HISTA_REQUEST_KEY not in batch.extra_info and plugin.HISTA_REQUEST_KEY not in out.extra_info
    options = options_from_request(seen[-1][plugin.HISTA_REQUEST_KEY])
    assert options.backend == "reference" and options.hista == plugin.HistaOptions(layer=2, temperature=0.5)

    config.algorithm.adv_estimator = "grpo"  # every other estimator: verl's call, untouched
    wrapped(trainer, batch, {})
    assert plugin.HISTA_REQUEST_KEY not in seen[-1]

    config.algorithm.adv_estimator = "sveb_hista"
    with pytest.raises(ValueError, match="critic.enable=False"):
        wrapped(SimpleNamespace(config=config, use_critic=True), batch, {})
    config.algorithm.sveb.hista.layer = "last"
    with pytest.raises(TypeError, match="layer"):
        plugin.HiddenStateCapture(torch.nn.Module(), layer=options_from_request(
            plugin.hista_request(plugin.Options.from_config(config.algorithm))).hista.layer)


def test_capture_through_a_lora_model(seed, tiny_model):
    """verl's actor with LoRA is a PEFT model: the hook lands on the wrapped model's own layer."""
    peft = pytest.importorskip("peft")
    from sveb_kernels.sveb import tiny

    model = tiny.build_model(tiny_model[1], layers=3, hidden_size=32)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    input_ids, attention, position_ids = padded_rollouts(model, torch.Generator().manual_seed(seed))
    with torch.no_grad(), plugin.HiddenStateCapture(lora, layer=2) as capture:
        want = lora(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                    output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(capture.hidden, want, rtol=0, atol=0)


def test_sveb_numca_carries_the_value_across_observation_tokens(seed):
    """A multi-turn response: masked observation tokens inside it are no milestones, and the state
    after them has the value at the last model token before them (not the value before any number)."""
    import sveb_kernels as sk

    data, tokenizer, scores = numca_data(seed)
    plugin.set_tokenizer(tokenizer)
    mask = data.batch["response_mask"]
    lengths = mask.sum(1).long()
    mask[:, 3:5] = 0  # an observation in every response
    data.batch["token_level_rewards"] = torch.zeros_like(mask)
    data.batch["token_level_rewards"][torch.arange(len(mask)), lengths - 1] = scores
    values = plugin.numca_values_for_batch(data)
    valid = mask.bool()
    _, group = np.unique(data.non_tensor_batch["uid"].astype(str), return_inverse=True)
    group = torch.as_tensor(group)
    spans = sk.numeric_spans(data.batch["responses"], sk.NumericVocab.from_tokenizer(tokenizer), mask=valid)
    after = sk.numca_values(spans, scores, group, valid, backend="reference").double()
    for b in range(len(group)):
        peers = [float(scores[j]) for j in range(len(group)) if group[j] == group[b] and j != b]
        carried = sum(peers) / len(peers)  # before any number
        for t in range(int(lengths[b])):
            if valid[b, t]:
                assert float(values[b, t]) == pytest.approx(carried, abs=1e-6), (b, t)
                carried = float(after[b, t])
            else:
                assert float(values[b, t]) == 0.0
