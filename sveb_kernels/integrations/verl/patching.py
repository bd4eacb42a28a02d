"""Every place the plugin touches verl, in one table (`TOUCHPOINTS`), and the one function that
applies it (`install`). Each touchpoint is patched on its own, the moment its module is imported
(in whichever process imports it: driver or worker), and checked then for exactly what its wrapper
uses: the parameters it reads by name (extra parameters are passed through untouched) and the
other verl symbols it calls. A touchpoint that fails its check is left unpatched with one
RuntimeWarning saying why; only the estimators that need it are disabled (they raise that reason),
every other touchpoint and estimator keeps working.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from . import driver, workers
from .options import ESTIMATORS

# The verl versions the plugin is tested with (CI installs the newest 0.9.x); outside them it still
# patches what passes its checks, after one warning.
TESTED_VERL = (">=0.9", "<0.10")

REGISTRY_MODULE = "verl.trainer.ppo.core_algos"
RAY_TRAINER_MODULE = "verl.trainer.ppo.ray_trainer"
COMPUTE_ADVANTAGE = f"{RAY_TRAINER_MODULE}.compute_advantage"
V1_MODULE = "verl.trainer.ppo.v1.trainer_base"
ENGINE_MODULE = "verl.workers.engine.base"
FSDP_MODULE = "verl.workers.engine.fsdp.transformer_impl"


@dataclass(frozen=True)
class Touchpoint:
    """One patch of verl: wrap `target` (a function or `Class.method` of `module`) with
    `make_wrapper(original)`, or for `kind="register"` call `make_wrapper(module)`.

    needs: the parameters the wrapper reads by name (must exist in verl's signature).
    symbols: the other verl names the wrapper uses, "module:attr.attr" (checked importable at patch time).
    optional: verl names only one option needs (a warning at patch time, the touchpoint still patched).
    serves: the estimators that need this touchpoint.
    where: the process it runs in.
    """

    name: str
    module: str
    target: str
    kind: str
    needs: tuple
    symbols: tuple
    serves: tuple
    where: str
    make_wrapper: Callable
    why: str
    optional: tuple = ()


def _register(core_algos) -> None:
    for name in ESTIMATORS:
        if name not in core_algos.ADV_ESTIMATOR_REGISTRY:
            core_algos.register_adv_est(name)(driver.registry_stub(name))


TOUCHPOINTS = (
    Touchpoint("registry", REGISTRY_MODULE, "register_adv_est", "register", (),
               (f"{REGISTRY_MODULE}:ADV_ESTIMATOR_REGISTRY",), (), "driver", _register,
               "the three names in verl's estimator registry, as functions that explain they run through "
               "compute_advantage (the registry passes no values or token ids)"),
    Touchpoint("compute_advantage", RAY_TRAINER_MODULE, "compute_advantage", "wrap",
               ("data", "adv_estimator", "gamma", "lam", "norm_adv_by_std_in_grpo", "config"),
               (), ESTIMATORS, "driver", driver.wrap_compute_advantage,
               "the sveb names -> compute_sveb_advantage; every other name -> verl's function unchanged",
               optional=(f"{REGISTRY_MODULE}:compute_pf_ppo_reweight_data",)),  # sveb_gae + use_pf_ppo
    Touchpoint("v1_compute_advantage", V1_MODULE, "PPOTrainer._compute_advantage", "wrap", ("self", "batch", "metrics"),
               (f"{V1_MODULE}:tq.kv_batch_get", f"{V1_MODULE}:tq.kv_batch_put", "verl:DataProto",
                "verl.workers.utils.padding:response_to_nested", "tensordict:TensorDict"),
               ("sveb_numca",), "driver", driver.wrap_v1_compute_advantage,
               "sveb_numca: Numca values from the queue's responses, written back as `values`; sveb/* metrics"),
    Touchpoint("v1_compute_old_log_prob", V1_MODULE, "PPOTrainer._compute_old_log_prob", "wrap", ("self", "batch"),
               (), ("sveb_hista",), "driver", driver.wrap_v1_compute_old_log_prob,
               "sveb_hista: the Hista options ride in the actor's log-prob batch (`extra_info`) for that call"),
    Touchpoint("engine_infer_batch", ENGINE_MODULE, "BaseEngine.infer_batch", "wrap", ("self", "data"),
               (f"{ENGINE_MODULE}:BaseEngine.get_data_parallel_group",), ("sveb_hista",), "workers",
               workers.wrap_engine_infer_batch,
               "sveb_hista: hook the chosen layer during the forward, return the values as model output `values`"),
    Touchpoint("fsdp_prepare_model_outputs", FSDP_MODULE, f"{workers.FSDP_CLASS}.{workers.FSDP_METHOD}", "wrap",
               ("self", "output_args", "micro_batch"), (f"{FSDP_MODULE}:FSDPEngine._gather_and_unpad_packed",),
               ("sveb_hista",), "workers", workers.wrap_prepare_model_outputs,
               "sveb_hista: copy each micro-batch's response states out of the hooked layer's output"),
)


class _State:
    def __init__(self):
        self.errors: dict = {}  # touchpoint name -> why it is not patched
        self.finder: Optional[_AfterImport] = None
        self.version_checked = False


STATE = _State()


def unavailable(estimator: str) -> Optional[str]:
    """Why `estimator` cannot run (the problems of the touchpoints it needs), or None."""
    problems = [STATE.errors[t.name] for t in TOUCHPOINTS if estimator in t.serves and t.name in STATE.errors]
    return "; ".join(problems) or None


def verl_version() -> str:
    return getattr(sys.modules.get("verl"), "__version__", "?")


def check_verl_version() -> Optional[str]:
    """One warning (per process) when verl's version is outside `TESTED_VERL`."""
    if STATE.version_checked or "verl" not in sys.modules:
        return None
    STATE.version_checked = True
    version = verl_version()
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) == (0, 9):
        return None
    message = (f"sveb_kernels' verl plugin is tested with verl {','.join(TESTED_VERL)}, found {version}; each patch "
               f"point is checked on its own (see sveb_kernels.integrations.verl.patching.TOUCHPOINTS)")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return message


def _resolve(module, path: str):
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def missing_symbol(symbol: str) -> Optional[str]:
    """None if "module:attr.attr" can be found (importing the module), else why not."""
    module_name, _, path = symbol.partition(":")
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        _resolve(module, path)
    except Exception as e:  # ImportError, AttributeError: the symbol is gone or moved
        return f"{module_name}.{path} not found ({type(e).__name__}: {e})"
    return None


def missing_parameters(function: Callable, needs: tuple) -> Optional[str]:
    """None if `function` has every parameter in `needs` (by name), else which are missing."""
    parameters = inspect.signature(inspect.unwrap(function)).parameters
    missing = [n for n in needs if n not in parameters]
    if missing:
        return f"has no parameter(s) {', '.join(missing)} (its parameters: {tuple(parameters)})"
    return None


def apply(point: Touchpoint, module) -> Optional[str]:
    """Patch one touchpoint in `module` (idempotent); returns the problem, or None when patched."""
    check_verl_version()
    where = f"{point.module}.{point.target}"
    if point.kind == "register":
        problem = None if hasattr(module, point.target) else f"{where} not found"
        problem = problem or next(filter(None, map(missing_symbol, point.symbols)), None)
        if problem is None:
            point.make_wrapper(module)
        return problem
    owner_path, _, attribute = point.target.rpartition(".")
    try:
        owner = _resolve(module, owner_path) if owner_path else module
        current = getattr(owner, attribute)
    except AttributeError:
        return f"{where} not found (verl {verl_version()})"
    if getattr(current, "__sveb_original__", None) is not None:
        return None
    problem = missing_parameters(current, point.needs)
    if problem is not None:
        return f"{where} {problem} (verl {verl_version()})"
    for symbol in point.symbols:
        problem = missing_symbol(symbol)
        if problem is not None:
            return f"{where} needs {problem} (verl {verl_version()})"
    for symbol in point.optional:
        problem = missing_symbol(symbol)
        if problem is not None:
            warnings.warn(f"sveb_kernels verl plugin: {point.name} patched, but {problem}: the option that "
                          f"uses it will fail (verl {verl_version()})", RuntimeWarning, stacklevel=3)
    setattr(owner, attribute, point.make_wrapper(current))
    return None


def _patch_module(module) -> None:
    for point in TOUCHPOINTS:
        if point.module != module.__name__:
            continue
        problem = apply(point, module)
        if problem is None:
            STATE.errors.pop(point.name, None)
            continue
        STATE.errors[point.name] = problem
        serves = ", ".join(point.serves) or "a clear error for the sveb names in verl's registry"
        # Loud but not fatal: verl and every other touchpoint keep working; these estimators raise.
        warnings.warn(f"sveb_kernels verl plugin: {point.name} not patched ({serves} unavailable): {problem}",
                      RuntimeWarning, stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a module's own code has executed, before anyone imports names
    from it; this is how the patch lands before verl's v1 trainer does
    `from verl.trainer.ppo.ray_trainer import compute_advantage`, without importing the (heavy)
    trainer in every verl process on `import verl`."""

    def __init__(self, modules):
        self.modules = set(modules)

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenCall(spec.loader, _patch_module)
        return spec


class _LoaderThenCall(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)


def install() -> None:
    """The single place where verl is modified (idempotent): every touchpoint of `TOUCHPOINTS`, each
    as soon as its module is imported (now, for modules already imported)."""
    modules = {point.module for point in TOUCHPOINTS}
    for name in sorted(modules):
        if name in sys.modules:
            _patch_module(sys.modules[name])
    if STATE.finder is None:
        STATE.finder = _AfterImport(modules)
        sys.meta_path.insert(0, STATE.finder)
