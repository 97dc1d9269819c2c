"""Shared test fixtures: seeded random generators whose seed is reported on failure.

Every random draw in the suite is seeded. `seed` is derived from the test's node id (stable from
run to run, different per test and parameter); set DELTAJAX_TEST_SEED to run a test with another
seed. A failing test that used `seed`, `rng` or `key` prints the seed it ran with.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the test helpers (hf_tiny, tiny_pair)

# Scripts run by the tests (in process or as subprocesses) share one fresh persistent
# compilation cache per test session (deltajax/jax_cache.py), never the user's ~/.cache.
os.environ.setdefault("DELTAJAX_COMPILATION_CACHE", tempfile.mkdtemp(prefix="deltajax-xla-"))


def _seed_for(nodeid: str) -> int:
    env = os.environ.get("DELTAJAX_TEST_SEED")
    return int(env) if env else zlib.crc32(nodeid.encode()) & 0x7FFFFFFF


@pytest.fixture
def seed(request) -> int:
    """This test's seed (reported if the test fails)."""
    s = _seed_for(request.node.nodeid)
    request.node.user_properties.append(("seed", s))
    return s


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """`np.random.default_rng(seed)`."""
    return np.random.default_rng(seed)


@pytest.fixture
def key(seed):
    """`jax.random.PRNGKey(seed)`."""
    import jax

    return jax.random.PRNGKey(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("seed", f"this test ran with seed {seeds[0]} "
                                 f"(rerun it with DELTAJAX_TEST_SEED={seeds[0]})"))
