"""Shared fixtures: a real Mosquitto broker per test, the package-dir import alias, and marks.

Marks (``make unit`` runs what has neither): ``broker`` for every test that uses the
``broker``/``broker_factory`` fixtures, ``torch`` for every test that uses a trained-model
fixture (or whose module says ``pytestmark = pytest.mark.torch``). They are given here
from the fixtures a test asks for, so a new test cannot forget them.

``broker``          a Mosquitto on a free loopback port, stopped at teardown.
``broker_factory``  ``broker_factory()`` starts another one (several per test are fine).

Each broker is a :class:`faultwatch.runtime.devtools.broker.MosquittoBroker` (the launcher
``faultwatch demo`` uses too) with ``.host``, ``.port``, ``.address``
(``"127.0.0.1:PORT"``), ``.stop()``, ``.start()``, ``.restart()``, ``.kill()``,
``.running`` and ``.log_text()``. Persistence is on (in the test's tmp dir), so
``stop()`` + ``start()`` keeps retained messages, persistent sessions and the
QoS 1 messages queued for them, as a production broker does.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultwatch.runtime.devtools.broker import BrokerError, BrokerUnavailable, MosquittoBroker, find_mosquitto

# Trained-model fixtures (tiny models, trained once per session) live in their own module.
pytest_plugins = ["model_fixtures"]

# --------------------------------------------------------------------------------------
# `pytest --doctest-modules runtime`: import runtime/*.py as faultwatch.runtime.*
#
# pyproject maps the folders runtime/, train/, export/ to the packages
# faultwatch.runtime, .train, .export. pytest names a collected file after its folder
# (`runtime.engine`) in every --import-mode, which would load a second copy of the
# module beside the installed `faultwatch.runtime.engine.engine` (other class identities,
# other module state, relative imports pulling more copies). This finder, first on
# sys.meta_path, answers for those folder names with the installed module itself, so
# doctests run in the real `faultwatch.runtime.*` modules. It is installed when this
# conftest loads, which pytest does before collecting `runtime` as long as `tests` is
# on the command line too (the Makefile runs `pytest --doctest-modules runtime tests`).
# --------------------------------------------------------------------------------------

_PACKAGE_DIRS = {
    "runtime": "faultwatch.runtime",
    "train": "faultwatch.train",
    "export": "faultwatch.export",
    "bench": "faultwatch.bench",
}


class _PackageDirAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases
        self._real_specs: dict[str, object] = {}

    def _real_name(self, fullname: str) -> str | None:
        head, dot, rest = fullname.partition(".")
        target = self.aliases.get(head)
        return None if target is None else target + dot + rest

    def find_spec(self, fullname, path=None, target=None):
        real = self._real_name(fullname)
        if real is None:
            return None
        try:
            if importlib.util.find_spec(real) is None:
                return None
        except ImportError:  # faultwatch not installed: leave the name to the usual finders
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(self._real_name(spec.name))
        self._real_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # importlib overwrote __spec__ with the alias spec; give the module its own back.
        module.__spec__ = self._real_specs.pop(module.__spec__.name)


if not any(isinstance(f, _PackageDirAlias) for f in sys.meta_path):
    sys.meta_path.insert(0, _PackageDirAlias(_PACKAGE_DIRS))


# --------------------------------------------------------------------------------------
# Mosquitto: the launcher is faultwatch.runtime.devtools.broker, shared with `faultwatch demo`.
# --------------------------------------------------------------------------------------


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[[], MosquittoBroker]]:
    """Returns a function that starts a new broker (in ``tmp_path/mosquitto-N``);
    all of them are stopped at teardown. No mosquitto binary fails the test (never skips)."""
    try:
        binary = find_mosquitto()
    except BrokerUnavailable as exc:
        missing = str(exc)
    else:
        missing = None
    if missing:  # failed outside the except block: one line, no chained traceback
        pytest.fail(f"tests need a real Mosquitto broker: {missing}", pytrace=False)
    started: list[MosquittoBroker] = []

    def make() -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path / f"mosquitto-{len(started)}", binary=binary)
        started.append(broker)
        return broker.start()

    yield make
    for broker in started:
        with contextlib.suppress(BrokerError):  # stop() leaves no process behind even when it raises
            broker.stop()


@pytest.fixture
def broker(broker_factory: Callable[[], MosquittoBroker]) -> MosquittoBroker:
    """A real Mosquitto on a free loopback port, fresh for each test."""
    return broker_factory()


# --------------------------------------------------------------------------------------
# Marks from fixtures: what a test needs decides whether `make unit` runs it.
# --------------------------------------------------------------------------------------

BROKER_FIXTURES = frozenset({"broker", "broker_factory"})
#: The session fixtures of model_fixtures.py: each trains (torch) and exports a model.
TORCH_FIXTURES = frozenset({"trained", "train_data", "train_csv", "run_dir", "fp32_model", "int8_model",
                            "export_reports", "torch_one_thread"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if needs & BROKER_FIXTURES:
            item.add_marker(pytest.mark.broker)
        if needs & TORCH_FIXTURES:
            item.add_marker(pytest.mark.torch)
