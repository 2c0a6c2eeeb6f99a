"""Tests of the YAML <-> dataclass config system and its command-line overrides."""

from dataclasses import dataclass, field

import pytest

from latentdiff.config import (
    ConfigError,
    from_dict,
    load_config,
    merge,
    parse_overrides,
    read_yaml,
    save_yaml,
    to_dict,
)


@dataclass
class Inner:
    lr: float = 1e-3
    mult: tuple[int, ...] = (1, 2)
    name: str = "x"
    flag: bool = False


@dataclass
class Outer:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_nested_keys_and_yaml_scalars():
    tree = parse_overrides(["inner.lr=1e-4", "steps=5", "inner.mult=1,2,4", "inner.flag=true", "inner.name=a=b"])
    assert tree == {"inner": {"lr": "1e-4", "mult": "1,2,4", "flag": True, "name": "a=b"}, "steps": 5}
    cfg = load_config(Outer, {"steps": 3}, ["inner.lr=1e-4", "inner.mult=1,2,4", "inner.mult=[4]"])
    assert cfg.inner.lr == 1e-4 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.mult == (4,)
    assert cfg.steps == 3


def test_types_are_coerced_and_checked():
    cfg = from_dict(Outer, {"steps": 7.0, "inner": {"lr": 1, "mult": [1, 2, 2], "flag": "yes"}})
    assert cfg.steps == 7 and cfg.inner.lr == 1.0 and cfg.inner.mult == (1, 2, 2) and cfg.inner.flag is True
    with pytest.raises(ConfigError, match="steps: expected an integer"):
        from_dict(Outer, {"steps": "many"})
    with pytest.raises(ConfigError, match="inner.flag: expected true/false"):
        from_dict(Outer, {"inner": {"flag": "perhaps"}})
    with pytest.raises(ConfigError, match="inner: expected a mapping"):
        from_dict(Outer, {"inner": 3})


def test_unknown_keys_are_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown config key 'inner.lrr' \\(did you mean 'lr'\\?\\)"):
        load_config(Outer, {}, ["inner.lrr=3"])
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["steps"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Outer, {}, ["inner.mult=[3,4]", "steps=2"])
    save_yaml(cfg, tmp_path / "c.yaml")
    again = from_dict(Outer, read_yaml(tmp_path / "c.yaml"))
    assert again == cfg
    assert to_dict(cfg) == {"steps": 2, "inner": {"lr": 1e-3, "mult": [3, 4], "name": "x", "flag": False}}


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_yaml(tmp_path / "list.yaml")


@pytest.mark.parametrize("name", ["kl-f4-fmnist", "vq-f4-fmnist", "kl-f4-photos64", "sd-kl-f8", "ldm-vq-f4",
                                  "ldm-vq-f8"])
def test_every_shipped_config_loads(name):
    from latentdiff.train.autoencoder import AutoencoderExperiment

    exp = load_config(AutoencoderExperiment, read_yaml(f"configs/{name}.yaml"))
    assert exp.task == "autoencoder"
    assert exp.data.image_size % exp.model.downsample_factor == 0


def test_overrides_reach_list_entries_by_name():
    """The conditioner's embedders are a list: ``embedders.caption.dropout=0.2`` updates the entry named caption
    (or, without a name, of that kind) and leaves the others and the order alone."""
    base = {"conditioner": {"embedders": [{"kind": "transformer", "name": "caption", "dropout": 0.1},
                                          {"kind": "inpaint", "dropout": 0.0}]}}
    got = merge(base, parse_overrides(["conditioner.embedders.caption.dropout=0.2",
                                       "conditioner.embedders.inpaint.full_prob=0.5"]))
    assert got["conditioner"]["embedders"] == [{"kind": "transformer", "name": "caption", "dropout": 0.2},
                                               {"kind": "inpaint", "dropout": 0.0, "full_prob": 0.5}]
    assert base["conditioner"]["embedders"][0]["dropout"] == 0.1  # the base is not edited
    with pytest.raises(ConfigError, match="no entry named 'captoin'; its entries are named caption, inpaint"):
        merge(base, parse_overrides(["conditioner.embedders.captoin.dropout=0.2"]))
    # a plain list is still replaced whole
    assert merge({"betas": [0.9, 0.99]}, {"betas": [0.5, 0.9]}) == {"betas": [0.5, 0.9]}
