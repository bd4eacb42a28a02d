import os
import random

import pytest
import torch

# Triton kernels under the interpreter must see TRITON_INTERPRET=1 before they are imported, so the
# tests in tests/triton/ run in a process of their own (tests/test_triton_interpreter.py starts it)
# unless this process is already that one or a GPU is present.
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    collect_ignore_glob = ["triton/*"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # The marker, not `"gpu" in item.keywords`: keywords also hold the names of the test and of
        # every parent directory, so a checkout in a folder named "gpu" would skip every test.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed():
    """A fresh seed per test (SVEB_TEST_SEED reproduces one); printed so a failure shows it."""
    value = int(os.environ.get("SVEB_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    print(f"seed={value}")
    return value


def _cpp_backend_reason():
    from sveb_kernels import _backend

    return _backend.why_unavailable("gae", "cpp", "cpu")


# CI builds the extension (SVEB_REQUIRE_CUDA_EXTENSION=1): there a missing cpp backend fails the tests
# that need it instead of skipping them.
_CPP_REASON = _cpp_backend_reason()
_CPP_MARKS = () if _CPP_REASON is None or os.environ.get("SVEB_REQUIRE_CUDA_EXTENSION") == "1" else (
    pytest.mark.skip(reason=f"cpp backend unavailable: {_CPP_REASON}"),)


@pytest.fixture(params=["reference", pytest.param("cpp", marks=_CPP_MARKS)])
def backend(request):
    """Each CPU backend in turn: the tests that take this fixture hold every backend to one contract."""
    return request.param
