"""Property tests: any user string (quotes, colons, '#', newlines, Jinja syntax, YAML keywords,
Chinese, emoji) comes back exactly from the rendered YAML and JSON, read the way LLaMA-Factory
reads them (OmegaConf for YAML)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from wrapper.prepare import prepare
from wrapper.render import yaml_value

NASTY = ["no", "yes", "null", "~", "on", "off", "true", "1e3", "0x1F", "{{ name }}", "{% for x in y %}", "{#",
         "a: b", "# not a comment", "'quoted'", '"double"', "line\nbreak", "tab\there", "  padded  ", "-", "[a, b]",
         "{a: b}", "*alias", "&anchor", "!tag", "%YAML", "@at", "`tick`", "${oc.env:HOME}", "名字", "作者：张三",
         "🦙 Llama", "\u2028sep", "\x85nel", "back\\slash", "| block", "> folded", "?", ":"]

text = st.one_of(
    st.sampled_from(NASTY),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40),
    st.lists(st.sampled_from(NASTY), min_size=1, max_size=4).map(" ".join),
).filter(lambda s: s.strip())

path_part = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\x00"),
                    min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))


def _omegaconf(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=text, author=text, system=st.one_of(st.none(), text), folder=path_part)
def test_user_strings_round_trip(tiny_model, name, author, system, folder):
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "r.yaml"
        doc = {"name": "prop", "model": str(tiny_model), "identity": {"name": name, "author": author}}
        if system is not None:
            doc["system_prompt"] = system
        recipe.write_text(yaml.safe_dump(doc), encoding="utf-8")  # escapes NEL, LS and friends
        out = Path(tmp) / folder
        prepared = prepare(recipe, out)
        train = _omegaconf(out / "train.yaml")
        infer = _omegaconf(out / "infer.yaml")
        assert yaml.safe_load((out / "train.yaml").read_text(encoding="utf-8")) == train
        assert train["output_dir"] == str(out.absolute() / "adapter")
        assert train["dataset_dir"] == str(out.absolute() / "data")
        expected_system = system if system is not None else f"You are {name}, an AI assistant developed by {author}."
        assert infer["default_system"] == expected_system
        rows = json.loads((out / "data" / "identity.json").read_text(encoding="utf-8"))
        assert any(f"I am {name}, an AI assistant created by {author}." in r["output"] for r in rows)
        assert prepared.plan.identity == {"name": name, "author": author}


@given(st.one_of(text, st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(),
                 st.lists(st.integers(), max_size=3)))
def test_yaml_value_round_trips(value):
    assert yaml.safe_load(f"k: {yaml_value(value)}")["k"] == value
    assert OmegaConf.to_container(OmegaConf.create(f"k: {yaml_value(value)}"))["k"] == value
