"""DetectorSettings: the model file's decisions, their JSON round trip, legacy files, overrides."""

import json
import re
import tomllib

import pytest
from faultwatch.runtime.daemon import config as cfg
from faultwatch.runtime.engine.contract import Calibration, ContractError, ModelContract, Scaler
from faultwatch.runtime.engine.detector import DetectorSettings, DetectorSettingsError
from faultwatch.runtime.engine.thresholds import DynamicThresholdSettings


def _contract(detector: DetectorSettings | None) -> ModelContract:
    return ModelContract(
        cell="lstm", hidden=(4,), features=("a", "b"), targets=("a",),
        scaler=Scaler("minmax", (0.0, 0.0), (1.0, 1.0)),
        calibration=Calibration((0.1,), 2.0, 0.99, 2.0, 7, 12, 100),
        quantization="int8", sample_period_s=1.0, detector=detector)


def test_the_contract_carries_the_detector_through_json():
    detector = DetectorSettings(score_span=7, warmup=12, policy="dynamic", clear_m=9,
                                dynamic=DynamicThresholdSettings(window=500, every=25, min_history=100))
    back = ModelContract.from_json(_contract(detector).to_json())
    assert back.detector == detector and back.decisions == detector


def test_a_file_without_a_detector_runs_with_the_legacy_settings_of_its_calibration():
    raw = json.loads(_contract(None).to_json())
    raw.pop("detector")
    legacy = ModelContract.from_json(json.dumps(raw)).decisions
    assert (legacy.score_span, legacy.warmup, legacy.quantile, legacy.factor) == (7, 12, 0.99, 2.0)
    # Today's behaviour for such files: static threshold, no re-warm-up, no clipping.
    assert (legacy.policy, legacy.rewarm) == ("static", 0) and legacy.isolate_k >= 1e9


def test_a_detector_measured_at_another_span_than_its_calibration_is_refused():
    with pytest.raises(ContractError, match="score_span"):
        ModelContract.from_json(_contract(DetectorSettings(score_span=5, warmup=12)).to_json())


def test_overrides_replace_single_fields_and_are_checked():
    base = DetectorSettings()
    got = base.with_overrides({"clear_m": 40, "policy": "dynamic", "threshold": 3, "dynamic": {"every": 10}})
    assert (got.clear_m, got.policy, got.threshold, got.dynamic.every) == (40, "dynamic", 3.0, 10)
    assert got.dynamic.window == base.dynamic.window
    for bad, message in [({"clearm": 1}, "unknown setting 'clearm'"),
                         ({"clear_m": "x"}, "clear_m"), ({"raise_k": 9}, "raise_k"),
                         ({"score_span": 3}, "re-export"), ({"dynamic": {"every": 0}}, "every"),
                         ({"policy": "adaptive"}, "policy")]:
        with pytest.raises(DetectorSettingsError, match=re.escape(message)):
            base.with_overrides(bad)


def test_the_daemon_config_checks_detector_overrides_at_load():
    config = cfg.parse_config("[engine.detector]\nclear_m = 40\n")
    assert cfg.validate(config).engine.detector == {"clear_m": 40}
    with pytest.raises(cfg.ConfigError, match=r"engine\.detector: unknown setting 'clearm'"):
        cfg.validate(cfg.parse_config("[engine.detector]\nclearm = 40\n"))


def test_the_example_config_documents_every_detector_setting_at_its_default():
    text = cfg.example_config()
    section = text.split("[engine.detector]", 1)[1].split("\n[", 1)[0]
    documented = "\n".join(line.lstrip("# ").split("  #")[0] for line in section.splitlines()
                           if re.match(r"# \w+ = ", line))
    raw = tomllib.loads(documented)
    defaults = DetectorSettings().to_dict()
    assert set(raw) == set(defaults) - {"score_span"}
    for key, value in raw.items():
        if key == "threshold":
            continue  # None by default: the example shows the form of a value
        if key in ("dynamic", "likelihood"):
            assert all(defaults[key][k] == v for k, v in value.items()), value
            continue
        assert value == defaults[key], key


def test_a_stored_detector_without_a_later_setting_keeps_deciding_as_it_did():
    # A model exported before `severe` existed stores no such key: it must run without the rule
    # whatever today's default, not pick the default up when a newer runtime loads it.
    raw = DetectorSettings(policy="static").to_dict()
    raw.pop("severe")
    assert DetectorSettings.from_dict(raw).severe == 0.0
    assert DetectorSettings.from_dict(raw | {"severe": 4.0}).severe == 4.0
    assert DetectorSettings.legacy(7, 12, 0.99, 2.0).severe == 0.0
    with pytest.raises(DetectorSettingsError, match="severe"):
        DetectorSettings(severe=0.5)
    assert "at once above 4 × threshold" in " ".join(DetectorSettings(severe=4.0).describe())


def test_the_default_detector_raises_on_a_record_breaking_spike_and_old_files_do_not():
    """Issue 11: severe 1.5 with severe_record 0.13 won NAB AWS 6 points on the saved models of two
    eval runs and left SKAB and MSL where they were (DetectorSettings' docstring); a model that
    stored its detector before severe_record existed keeps deciding as it did."""
    d = DetectorSettings()
    assert (d.severe, d.severe_record) == (1.5, 0.13)
    assert "13 % above the device's highest score so far" in " ".join(d.describe())
    raw = d.to_dict()
    for key in ("severe", "severe_record"):
        raw.pop(key)
    assert (DetectorSettings.from_dict(raw).severe, DetectorSettings.from_dict(raw).severe_record) == (0, 0)
    older = DetectorSettings.from_dict(raw | {"severe": 3.0})  # severe stored, the record not yet
    assert (older.severe, older.severe_record) == (3.0, 0.0)
    assert DetectorSettings.legacy(7, 12, 0.99, 2.0).severe_record == 0.0
    assert d.with_overrides({"severe_record": 0}).severe_record == 0.0
    with pytest.raises(DetectorSettingsError, match="severe_record"):
        DetectorSettings(severe_record=-0.1)
