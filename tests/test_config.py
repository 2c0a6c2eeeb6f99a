"""Tests of the YAML <-> dataclass config system and its command-line overrides."""

from dataclasses import dataclass, field

import pytest

from latentdiff.config import (
    MAX_YAML_ALIASES,
    MAX_YAML_BYTES,
    MAX_YAML_NODES,
    ConfigError,
    check_ranges,
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


@dataclass
class Ranged:
    steps: int = 1
    lr: float = 0.1
    mult: tuple[int, ...] = (1,)
    p: float = 0.5

    def __post_init__(self) -> None:
        check_ranges(self, positive=("steps", "lr"), fractions=("p",), positive_items=("mult",))


@pytest.mark.parametrize("data,message", [
    ({"steps": float("inf")}, "steps: expected an integer, got inf"),
    ({"steps": 1.5}, "steps: expected an integer, got 1.5"),
    ({"steps": True}, "steps: expected an integer, got True"),
    ({"steps": "nan"}, "steps: expected an integer"),
    ({"steps": [1]}, "steps: expected an integer, got [1]"),
    ({"lr": float("nan")}, "lr: expected a finite number, got nan"),
    ({"lr": "-inf"}, "lr: expected a finite number"),
    ({"lr": {"a": 1}}, "lr: expected a number"),
    ({"steps": 0}, "steps must be > 0, got 0"),
    ({"steps": -5}, "steps must be > 0, got -5"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"mult": []}, "mult must be a non-empty list of positive numbers, got ()"),
    ({"mult": [1, 0]}, "mult must be a non-empty list of positive numbers"),
    ({"p": 1.5}, "p must be in [0, 1], got 1.5"),
])
def test_types_and_ranges_are_checked_at_start_up(data, message):
    with pytest.raises(ConfigError) as error:
        from_dict(Ranged, data)
    assert message in str(error.value)


def test_a_list_where_a_mapping_belongs_is_one_line():
    with pytest.raises(ConfigError, match=r"^Outer: expected a mapping, got \[\]$"):
        from_dict(Outer, [])
    with pytest.raises(ConfigError, match="inner: expected a mapping, got \\[1, 2\\]"):
        load_config(Outer, {"inner": [1, 2]})


def test_yaml_aliases_are_limited_and_values_not_echoed(tmp_path):
    (tmp_path / "anchors.yaml").write_text("a: &x {lr: 0.5}\nb: *x\n")
    assert read_yaml(tmp_path / "anchors.yaml") == {"a": {"lr": 0.5}, "b": {"lr": 0.5}}  # a few are fine
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True))
    (tmp_path / "laughs.yaml").write_text(laughs)
    with pytest.raises(ConfigError, match=f"expands .* to more than {MAX_YAML_NODES} values"):
        read_yaml(tmp_path / "laughs.yaml")
    (tmp_path / "many.yaml").write_text("a: &a 1\nb: [" + ", ".join(["*a"] * (MAX_YAML_ALIASES + 1)) + "]\n")
    with pytest.raises(ConfigError, match="more than 100 YAML aliases"):
        read_yaml(tmp_path / "many.yaml")
    (tmp_path / "self.yaml").write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match="expands"):
        read_yaml(tmp_path / "self.yaml")
    (tmp_path / "big.yaml").write_text("a: 1\n" + "#" * MAX_YAML_BYTES)
    with pytest.raises(ConfigError, match="limited to"):
        read_yaml(tmp_path / "big.yaml")
    with pytest.raises(ConfigError, match="expands"):
        parse_overrides(["steps=" + laughs.replace("\n", ", ").join("{}")])
    with pytest.raises(ConfigError) as error:  # a long value is cut in the message
        from_dict(Outer, {"steps": "x" * 10_000})
    assert len(str(error.value)) < 120
    (tmp_path / "tag.yaml").write_text("a: !!python/object/apply:os.system ['echo ran']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tmp_path / "tag.yaml")
