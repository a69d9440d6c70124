"""The edge install never needs torch: every module under ``faultwatch.runtime`` imports without it.

The modules are found by walking the package, so a module added anywhere under
``runtime/`` is checked the day it is added; a new ``import torch`` (or onnx) there, at
any depth of the import chain, fails this test.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import HEAVY, WITHOUT_HEAVY

CODE = WITHOUT_HEAVY + f"""
import importlib, json, pkgutil
import faultwatch.runtime
failed = {{}}
names = [m.name for m in pkgutil.walk_packages(faultwatch.runtime.__path__, "faultwatch.runtime.",
                                                onerror=lambda name: failed.setdefault(name, "walk"))]
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps({{"modules": names, "failed": failed,
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})}}))
"""


def test_every_runtime_module_imports_without_torch():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}, report["failed"]
    assert report["heavy"] == []
    modules = set(report["modules"])
    # The walk really descended into every subpackage (not just the top level).
    for name in ("cli", "engine.engine", "daemon.daemon", "daemon.mqtt.connection", "offline.replay",
                 "devtools.broker"):
        name = f"faultwatch.runtime.{name}"
        assert name in modules
