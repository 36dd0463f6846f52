"""Property-based tests of pipeline validation: mutate a valid pipeline and check that every invalid
result is refused with a ConfigError (never another exception) and every valid one still loads."""

from __future__ import annotations

import copy
import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flowrl import registry
from flowrl.config import ConfigError, ResolvedPipeline, read_yaml, resolve

#: A valid pipeline that exercises every section (no weights are loaded by validation).
BASE_TEXT = """\
name: t
model:
  path: assets/toy-sd3
  lora: {rank: 4, alpha: 8}
rewards:
  - {kind: geneval, weight: 1.0}
  - {kind: ocr, name: text, weight: 0.5}
sampler: {kind: dpm2, steps: 10}
estimator: {kind: elbo, timestep_fraction: 0.5}
objective: {kind: pepg, kl: {kind: girsanov, beta: 0.0}}
advantage: {kind: exact}
optimizer: {lr: 0.001, grad_clip: 1.0}
train:
  epochs: 3
  batch_size: 16
  micro_batch: 8
  ema_decay: 0.9
  max_bad_steps: 3
prompts:
  group_size: 4
eval:
  every: 2
  images_per_prompt: 2
  sampler: {kind: euler, steps: 4}
checkpoint: {keep_last: 2}
"""
BASE = yaml.safe_load(BASE_TEXT)

#: The stage sections of BASE and the registry kind their `kind` names.
STAGES = {
    ("sampler",): "sampler", ("estimator",): "estimator", ("objective",): "objective",
    ("advantage",): "advantage", ("eval", "sampler"): "sampler", ("rewards", 0): "reward", ("rewards", 1): "reward",
}

#: Numeric settings with values outside their allowed range and values inside it (chosen so that
#: the graph checks, e.g. group_size dividing batch_size, still hold).
RANGES: dict[tuple, tuple[st.SearchStrategy, st.SearchStrategy]] = {
    ("train", "epochs"): (st.integers(max_value=0), st.integers(1, 10**6)),
    ("train", "batch_size"): (st.integers(max_value=0) | st.sampled_from([12, 20, 36]), st.integers(1, 50).map(lambda k: 8 * k)),
    ("train", "micro_batch"): (st.integers(max_value=0) | st.sampled_from([3, 5, 6, 7]), st.sampled_from([1, 2, 4, 8, 16])),
    ("train", "ema_decay"): (st.floats(min_value=1.0, allow_infinity=False) | st.floats(max_value=-1e-9, allow_infinity=False), st.floats(0.0, 0.999)),
    ("train", "max_bad_steps"): (st.integers(max_value=0), st.integers(1, 1000)),
    ("optimizer", "lr"): (st.floats(max_value=0.0, allow_infinity=False) | st.sampled_from([float("inf"), float("nan")]), st.floats(1e-12, 10.0)),
    ("optimizer", "grad_clip"): (st.floats(max_value=0.0, allow_infinity=False), st.floats(1e-6, 1e6)),
    ("prompts", "group_size"): (st.integers(max_value=1) | st.sampled_from([3, 5, 6, 7]), st.sampled_from([2, 4, 8, 16])),
    ("checkpoint", "keep_last"): (st.integers(max_value=0), st.integers(1, 100)),
    ("eval", "every"): (st.integers(max_value=-1), st.integers(0, 100)),
    ("eval", "images_per_prompt"): (st.integers(max_value=0), st.integers(1, 64)),
    ("sampler", "steps"): (st.integers(max_value=0), st.integers(1, 100)),
    ("estimator", "timestep_fraction"): (st.floats(min_value=1.0001, allow_infinity=False) | st.floats(max_value=0.0, allow_infinity=False), st.floats(0.01, 1.0)),
    ("objective", "kl", "beta"): (st.floats(max_value=-1e-9, allow_infinity=False) | st.just(float("inf")), st.floats(0.0, 1.0)),
    ("model", "lora", "rank"): (st.integers(max_value=0), st.integers(1, 256)),
    ("rewards", 0, "weight"): (st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.floats(-10.0, 10.0)),
}


def leaf_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a scalar value of nested dicts/lists."""
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in leaf_paths(v, prefix + (k,))]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in leaf_paths(v, prefix + (i,))]
    return [prefix]


def all_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a key or list item (sections and leaves)."""
    out = []
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += all_paths(v, prefix + (k,))
    return out


def key_paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Paths whose last part is a mapping key (what can be misspelled)."""
    return [p for p in all_paths(data, prefix) if isinstance(p[-1], str)]


def get(data: Any, path: tuple) -> Any:
    for k in path:
        data = data[k]
    return data


def put(data: dict, path: tuple, value: Any) -> dict:
    data = copy.deepcopy(data)
    get(data, path[:-1])[path[-1]] = value
    return data


def load(data: Any) -> ResolvedPipeline:
    """Validate plain data the way `load_pipeline` does a file: through YAML text, with lines."""
    parsed, lines = read_yaml(yaml.safe_dump(data, sort_keys=False), "p.yaml")
    return resolve(parsed, "p.yaml", lines)


def refused(data: Any) -> ConfigError:
    """The ConfigError `data` must raise; any other outcome fails the test."""
    try:
        load(data)
    except ConfigError as err:
        return err
    pytest.fail(f"accepted an invalid pipeline:\n{yaml.safe_dump(data, sort_keys=False)}")


def required(path: tuple) -> bool:
    """Whether deleting `path` from BASE must be refused: `rewards`, and the kind of a stage."""
    return path == ("rewards",) or (path[-1] == "kind" and path[:-1] in STAGES)


KNOWN_KEYS = {str(k) for p in all_paths(load(BASE).to_dict()) for k in p}
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_base_is_valid():
    assert load(BASE).config.train.batch_size == 16


@PROPERTY
@given(path=st.sampled_from(all_paths(BASE)))
def test_deleting_a_key_refuses_exactly_the_required_ones(path):
    container = copy.deepcopy(BASE)
    del get(container, path[:-1])[path[-1]]
    if required(path):
        err = refused(container)
        assert any(i.key.startswith(".".join(map(str, path[:1]))) for i in err.issues), str(err)
    else:
        load(container)


OTHER_TYPE = {
    str: st.integers() | st.floats(allow_nan=False) | st.lists(st.integers(), max_size=2) | st.dictionaries(st.sampled_from("ab"), st.integers(), min_size=1),
    (int, float): st.text(string.ascii_letters, min_size=1, max_size=8).filter(lambda s: s.lower() not in {"nan", "inf", "infinity"})
    | st.lists(st.integers(), min_size=1, max_size=2) | st.dictionaries(st.sampled_from("ab"), st.integers(), min_size=1),
}


@PROPERTY
@given(data=st.data(), path=st.sampled_from(leaf_paths(BASE)))
def test_a_value_of_another_type_is_refused_at_its_key(data, path):
    value = get(BASE, path)
    other = data.draw(OTHER_TYPE[str] if isinstance(value, str) else OTHER_TYPE[(int, float)])
    err = refused(put(BASE, path, other))
    dotted = ".".join(map(str, path[:-1] if path[-1] == "kind" else path))
    assert any(i.key.startswith(dotted) for i in err.issues), (dotted, str(err))


@PROPERTY
@given(data=st.data(), path=st.sampled_from(sorted(RANGES, key=str)), valid=st.booleans())
def test_numbers_out_of_range_are_refused_and_in_range_load(data, path, valid):
    bad, good = RANGES[path]
    mutated = put(BASE, path, data.draw(good if valid else bad))
    if valid:
        assert load(mutated) is not None
    else:
        err = refused(mutated)
        graph_keys = {"prompts.group_size", "train.micro_batch", "train.steps_per_epoch", "estimator.noise"}
        dotted = ".".join(map(str, path))
        assert any(i.key == dotted or i.key in graph_keys for i in err.issues), (dotted, str(err))


def misspell(word: str, how: int, where: int, letter: str) -> str:
    """Delete, double, swap or replace a character of `word`."""
    i = where % len(word)
    if how == 0:
        return word[:i] + word[i + 1 :]
    if how == 1:
        return word[:i] + word[i] + word[i:]
    if how == 2 and i + 1 < len(word):
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    return word[:i] + letter + word[i + 1 :]


@PROPERTY
@given(path=st.sampled_from(key_paths(BASE)), how=st.integers(0, 3), where=st.integers(0, 50), letter=st.sampled_from("aeiouxz_"))
def test_a_misspelled_key_is_refused_with_its_location(path, how, where, letter):
    wrong = misspell(path[-1], how, where, letter)
    assume(wrong and wrong not in KNOWN_KEYS)
    container = copy.deepcopy(BASE)
    parent = get(container, path[:-1])
    parent[wrong] = parent.pop(path[-1])
    err = refused(container)
    assert any(wrong in i.key or wrong in i.message or path[-1] == "kind" or path == ("rewards",) for i in err.issues), str(err)


NAMES = st.text(string.ascii_letters + string.digits + "-_", max_size=12)
USER_PATHS = st.builds(
    lambda module, cls: f"{module}:{cls}",
    st.sampled_from(["", "json", "flowrl", "flowrl.types", "no_such_module_xyz", "flowrl.no_such"]),
    st.text(string.ascii_letters, max_size=8).map(lambda s: "X" + s),
)


@PROPERTY
@given(section=st.sampled_from(sorted(STAGES, key=str)), name=NAMES | USER_PATHS)
def test_an_unknown_stage_name_is_refused(section, name):
    assume(name not in registry.names(STAGES[section]))
    err = refused(put(BASE, section + ("kind",), name))
    assert any(i.key == ".".join(map(str, section + ("kind",))) for i in err.issues), str(err)


JUNK = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)


@st.composite
def mutated(draw) -> Any:
    """BASE after 1-4 random edits: delete, replace by junk, add a junk key, rename a key."""
    data = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        paths = all_paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = get(data, path[:-1])
        action = draw(st.sampled_from(["delete", "junk", "add", "rename"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "junk":
            parent[path[-1]] = draw(JUNK)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(JUNK)
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = parent.pop(path[-1])
    return data


@PROPERTY
@given(data=mutated())
def test_any_mutation_loads_or_raises_config_error_and_nothing_else(data):
    try:
        load(data)
    except ConfigError as err:
        assert err.issues and all(isinstance(i.message, str) and i.message for i in err.issues)


@PROPERTY
@given(cut=st.integers(0, len(BASE_TEXT) - 1), length=st.integers(1, 8), insert=st.text(":-[]{}#&*!|>'\"\n ab1", max_size=4))
def test_corrupted_yaml_text_loads_or_raises_config_error(cut, length, insert):
    text = BASE_TEXT[:cut] + insert + BASE_TEXT[cut + length :]
    try:
        data, lines = read_yaml(text, "p.yaml")
        resolve(data, "p.yaml", lines)
    except ConfigError:
        pass
