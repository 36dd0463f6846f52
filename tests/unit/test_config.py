"""pipeline.yaml: schema, overrides, graph checks, and error messages that teach."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from flowrl.cli import main
from flowrl.config import ConfigError, apply_overrides, load_pipeline, read_yaml, resolve

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "pipelines" / "toy-geneval.yaml"

BASE = """\
name: t
model:
  path: assets/toy-sd3
rewards:
  - {kind: geneval}
sampler: {kind: dpm2, steps: 10}
estimator: {kind: elbo}
objective: {kind: pepg}
advantage: {kind: exact}
train:
  batch_size: 16
  micro_batch: 8
prompts:
  group_size: 4
"""


def errors_of(text: str, tmp_path: Path, overrides=()) -> ConfigError:
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(f, overrides)
    return info.value


def test_base_is_valid_and_fills_defaults(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text(BASE)
    p = load_pipeline(f)
    assert p.sampler.kind == "dpm2" and p.sampler.steps == 10
    assert p.objective.kl.kind == "girsanov" and p.objective.kl.beta == pytest.approx(1e-4)
    assert p.config.optimizer.lr == pytest.approx(3e-4)
    d = p.to_dict()
    assert d["estimator"]["weighting"] == "adaptive" and d["eval"]["sampler"]["kind"] == "euler"


def test_overrides_apply_and_validate(tmp_path: Path):
    f = tmp_path / "p.yaml"
    f.write_text(BASE)
    p = load_pipeline(f, ["train.epochs=3", "sampler.kind=euler", "rewards.0.weight=2.5", "objective.kl.beta=0"])
    assert p.config.train.epochs == 3 and p.sampler.kind == "euler"
    assert p.rewards[0].weight == 2.5 and p.objective.kl.beta == 0
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


@pytest.mark.parametrize(
    "edit, key, needle, line",
    [
        (lambda s: s + "optimiser: {lr: 0.1}\n", "optimiser", "did you mean 'optimizer'", 15),
        (lambda s: s.replace("  batch_size: 16", "  batch_size: 16\n  epoch: 3"), "train.epoch", "did you mean 'epochs'", 12),
        (lambda s: s.replace("  batch_size: 16", "  batch_size: sixteen"), "train.batch_size", "sixteen", 11),
        (lambda s: s + "optimizer: {lr: -1}\n", "optimizer.lr", "greater than 0", 15),
        (lambda s: s.replace("kind: dpm2", "kind: dpm"), "sampler.kind", "did you mean 'dpm2'", 6),
        (lambda s: s.replace("steps: 10", "stepz: 10"), "sampler.stepz", "did you mean 'steps'", 6),
        (lambda s: s.replace("{kind: geneval}", "{kind: genevall}"), "rewards.0.kind", "did you mean 'geneval'", 5),
        (lambda s: s.replace("kind: pepg}", "kind: pepg, kl: {kind: girsanov, beta: -1}}"), "objective.kl.beta", "greater than or equal to 0", 8),
        (lambda s: s.replace("{kind: elbo}", "{kind: elbo, weighting: adapt}"), "estimator.weighting", "adaptive", 7),
    ],
)
def test_schema_mistakes_name_line_key_and_fix(tmp_path, edit, key, needle, line):
    err = errors_of(edit(BASE), tmp_path)
    hits = [i for i in err.issues if i.key == key]
    assert hits, f"no issue for {key}: {err}"
    assert needle in hits[0].message, hits[0].message
    assert hits[0].line == line
    assert f"p.yaml:{line}: {key}:" in str(err)


@pytest.mark.parametrize(
    "edit, key, needle",
    [
        (lambda s: s.replace("{kind: elbo}", "{kind: trajectory}"), "estimator.kind", "flow-sde"),
        (lambda s: s.replace("group_size: 4", "group_size: 5"), "prompts.group_size", "does not divide"),
        (lambda s: s.replace("micro_batch: 8", "micro_batch: 6"), "train.micro_batch", "does not divide"),
        (lambda s: s.replace("group_size: 4", "group_size: 1"), "prompts.group_size", "zero"),
        (lambda s: s.replace("kind: pepg}", "kind: nft}").replace("{kind: elbo}", "{kind: trajectory}").replace("kind: dpm2", "kind: flow-sde"), "objective.kind", "elbo"),
        (lambda s: s.replace("kind: pepg}", "kind: pepg, kl: {kind: gaussian-step}}"), "objective.kl.kind", "girsanov"),
        (lambda s: s.replace("{kind: elbo}", "{kind: elbo, noise: per-group}").replace("micro_batch: 8", "micro_batch: 2"), "estimator.noise", "whole groups"),
    ],
)
def test_contradictions_are_refused_with_the_fix(tmp_path, edit, key, needle):
    err = errors_of(edit(BASE), tmp_path)
    hits = [i for i in err.issues if i.key == key]
    assert hits and needle in hits[0].message, str(err)


def test_all_errors_are_reported_together(tmp_path):
    text = BASE.replace("steps: 10", "steps: 0").replace("{kind: exact}", "{kind: exakt}") + "logging: {tensorbord: true}\n"
    err = errors_of(text, tmp_path)
    assert {i.key for i in err.issues} >= {"sampler.steps", "advantage.kind", "logging.tensorbord"}


def test_malformed_yaml_and_non_mapping(tmp_path):
    err = errors_of("model:\n  path: [unclosed\nrewards: 3\n", tmp_path)
    assert "malformed YAML" in str(err) and err.issues[0].line is not None
    err = errors_of("- just\n- a list\n", tmp_path)
    assert "mapping" in str(err)


def test_missing_rewards_section(tmp_path):
    err = errors_of(BASE.replace("rewards:\n  - {kind: geneval}\n", ""), tmp_path)
    assert any(i.key == "rewards" and "missing" in i.message for i in err.issues)


def test_read_yaml_tracks_lines():
    _, lines = read_yaml("a:\n  b: 1\nc:\n  - x: 1\n", "f")
    assert lines[("a", "b")] == 2 and lines[("c", 0, "x")] == 4


def test_validate_cli_ok_and_errors(tmp_path):
    res = CliRunner().invoke(main, ["validate", str(TOY)])
    assert res.exit_code == 0 and "ok" in res.output, res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE.replace("kind: dpm2", "kind: dpm"))
    res = CliRunner().invoke(main, ["validate", str(bad)])
    assert res.exit_code == 2 and "bad.yaml:6: sampler.kind" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = CliRunner().invoke(main, ["validate", str(TOY), "train.epochs"])
    assert res.exit_code == 2 and "key.sub=value" in res.output


def test_every_shipped_pipeline_validates():
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        load_pipeline(path)


def test_resolve_plain_data():
    import yaml

    p = resolve(yaml.safe_load(BASE))
    assert p.config.prompts.group_size == 4


def test_one_reading_of_overrides_for_train_eval_and_score():
    from flowrl.score import parse_override as score_override
    from flowrl.config import parse_override, split_override
    from flowrl.errors import FlowrlError
    from flowrl.evaluate import _parse_reward_override
    from flowrl.rewards.clipscore import ClipScoreReward

    assert split_override("train.epochs=20") == (["train", "epochs"], 20)
    assert split_override("rewards.0.weight=[0, 1]") == (["rewards", "0", "weight"], [0, 1])
    assert split_override("output=") == (["output"], "")
    assert split_override("name=a: b: c") == (["name"], "a: b: c")  # not YAML: the string itself
    assert split_override("epochs") is None and split_override("=3") is None
    with pytest.raises(FlowrlError, match="key.sub=value"):
        parse_override("epochs")
    assert _parse_reward_override("geneval.backend=hf-mask2former", ["geneval"]) == ("geneval", "backend", "hf-mask2former")
    assert score_override("clipscore.batch_size=8", {"clipscore": ClipScoreReward}) == ("clipscore", "batch_size", 8)
    for bad in ("geneval", "backend=x", "geneval.=x"):
        with pytest.raises(FlowrlError, match="NAME.KEY=VALUE"):
            _parse_reward_override(bad, ["geneval"])
