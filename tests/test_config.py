"""Pipeline config files: the shipped ones load, unknown keys and bad overrides are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dense.config import EncoderConfig, TrainConfig
from hybrid.config import ConfigError, PipelineConfig, load_config
from hybrid.pipeline import Pipeline

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_their_dense_sections_validate(path):
    config = load_config(path)
    assert isinstance(config, PipelineConfig)
    EncoderConfig.from_dict({"model_name_or_path": "some-model", **config.dense.encoder})
    TrainConfig.from_dict(config.dense.train)
    assert config.fusion.holdout_queries > 0


REPO = Path(__file__).resolve().parents[1]


def test_the_committed_data_files_match_the_checksums_that_pin_them():
    """The CPU config's synthetic set and expansion files, and every file README offers with a checksum, are the
    bytes the repo holds: a regenerated file without its new checksum would make `make run` refuse it."""
    import re

    from dense.querygen.output import file_sha256

    config = load_config(REPO / "configs" / "cpu-marco43k.toml")
    pinned = {config.synthetic.precomputed: config.synthetic.precomputed_sha256,
              config.sparse.expansion.file: config.sparse.expansion.sha256,
              **dict(zip(config.sparse.expansion.extra_files, config.sparse.expansion.extra_sha256))}
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    offered = re.findall(r'extra_files=\["([^"]+)"\]\'\s*\\\s*'
                         r'--set \'sparse\.expansion\.extra_sha256=\["([0-9a-f]{64})"\]', readme)
    assert offered, "README no longer shows how to add an extra expansion file"
    pinned.update(offered)
    for path, sha in pinned.items():
        assert file_sha256(REPO / path) == sha, path


def test_unknown_keys_are_refused_with_the_section(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[fusion]\ndepht = 10\n")
    with pytest.raises(ConfigError, match=r"depht.*\[fusion\]"):
        load_config(bad)


def test_overrides_take_toml_values_and_bare_strings(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ndir = "x"\n')
    config = load_config(cfg, ["fusion.depth=7", "data.dir=/some/where", "dense.train.max_steps=3"])
    assert config.fusion.depth == 7
    assert config.data.dir == "/some/where"
    assert config.dense.train == {"max_steps": 3}
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(cfg, ["no-equals-sign"])


def test_second_round_settings_are_read_from_a_table_and_checked(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[dense.refine]\nsteps = 40\ndepth = 30\n")
    refine = load_config(cfg).dense.refine
    assert (refine.steps, refine.depth, refine.skip_top, refine.negatives, refine.keep_bm25) == (40, 30, 3, 3, True)
    for bad in ("dense.refine.depth=3", "dense.refine.negatives=0", "dense.refine.steps=-1"):
        with pytest.raises(ConfigError, match="dense.refine"):
            load_config(cfg, [bad])


def test_missing_file_and_missing_data_dir(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    monkeypatch.delenv("MSMARCO_DIR", raising=False)
    with pytest.raises(ConfigError, match="MSMARCO_DIR"):
        PipelineConfig().data_dir()


def test_fingerprints_change_downstream_only(tmp_path, monkeypatch):
    monkeypatch.setenv("MSMARCO_DIR", str(tmp_path))
    base = Pipeline(PipelineConfig(), tmp_path / "a")
    changed = Pipeline(load_config(CONFIGS[0], ["fusion.depth=3"]), tmp_path / "a")
    same_data = Pipeline(load_config(CONFIGS[0]), tmp_path / "a")
    assert changed.inputs_fingerprint("fusion") != same_data.inputs_fingerprint("fusion")
    assert changed.inputs_fingerprint("evaluate") != same_data.inputs_fingerprint("evaluate")
    assert changed.inputs_fingerprint("dense_train") == same_data.inputs_fingerprint("dense_train")
    assert base.inputs_fingerprint("data") != base.inputs_fingerprint("bm25")


EVALUATION_SPLITS = {"dev", "dl19", "dl20", *PipelineConfig().data.eval_splits}
# Fields that name evaluation splits on purpose: what to evaluate on and how to grade it.
EVALUATION_FIELDS = {"data.eval_splits", "data.rel_levels"}


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, (list, tuple, set)):
        return [s for v in value for s in _strings(v)]
    return []


def _fields(config, prefix: str = ""):
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _fields(value, f"{name}.")
        else:
            yield name, value


@pytest.mark.parametrize("config", [PipelineConfig(), *map(load_config, CONFIGS)],
                         ids=["defaults", *(p.name for p in CONFIGS)])
def test_no_setting_outside_evaluation_names_an_evaluation_split(config):
    """Selection (checkpoints, fusion, rerank settings) uses held-out train queries; a field that names dev or
    DL is a leak waiting to be switched on."""
    leaks = {name: value for name, value in _fields(config)
             if name not in EVALUATION_FIELDS and EVALUATION_SPLITS & set(_strings(value))}
    assert leaks == {}


@pytest.mark.parametrize(("field", "default", "others", "bad"), [
    ("dtype", "float32", ("auto", "bfloat16"), "float16"),
    ("attention", "sdpa", ("eager",), "flash"),
])
def test_rerank_scorer_settings_are_checked_and_their_defaults_leave_the_rerank_fingerprint_alone(
        tmp_path, monkeypatch, field, default, others, bad):
    monkeypatch.setenv("MSMARCO_DIR", str(tmp_path))

    def pipeline(value: str) -> Pipeline:
        config = PipelineConfig()
        return Pipeline(dataclasses.replace(config, rerank=dataclasses.replace(config.rerank, **{field: value})),
                        tmp_path / "a")

    # the default stays out of the stage's inputs, so rerank stages built before the field existed still hold
    assert field not in pipeline(default)._rerank_section()
    prints = {value: pipeline(value).inputs_fingerprint("rerank") for value in (default, *others)}
    assert len(set(prints.values())) == len(prints)
    assert pipeline(others[0]).inputs_fingerprint("fusion") == pipeline(default).inputs_fingerprint("fusion")
    with pytest.raises(ConfigError, match=f"rerank.{field}"):
        load_config(CONFIGS[0], [f'rerank.{field}="{bad}"'])


def test_rerank_few_shot_is_checked_and_zero_leaves_the_rerank_fingerprint_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MSMARCO_DIR", str(tmp_path))

    def pipeline(**rerank) -> Pipeline:
        config = PipelineConfig()
        return Pipeline(dataclasses.replace(config, rerank=dataclasses.replace(config.rerank, **rerank)), tmp_path)

    zero = pipeline().inputs_fingerprint("rerank")
    assert "few_shot" not in pipeline()._rerank_section()
    assert pipeline(few_shot_seed=3).inputs_fingerprint("rerank") == zero  # the seed draws nothing at zero shots
    assert zero != pipeline(few_shot=3).inputs_fingerprint("rerank") != pipeline(few_shot=3, few_shot_seed=1) \
        .inputs_fingerprint("rerank")
    with pytest.raises(ConfigError, match="rerank.few_shot"):
        load_config(CONFIGS[0], ["rerank.few_shot=-1"])
    with pytest.raises(ConfigError, match="query-likelihood"):
        load_config(CONFIGS[0], ["rerank.few_shot=2", 'rerank.scorer="cross_encoder"'])
