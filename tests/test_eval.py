"""lfw eval: the scorer on fixed answers (pure), the shipped question sets, the user's file, and a
real run on the tiny model that writes eval.json with both models' scores."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, lfw
from wrapper.errors import LfwError
from wrapper.evaluate import (
    Question,
    identity_hit,
    load_questions,
    mentions,
    read_questions_file,
    retention_hit,
    score,
    table_rows,
)

NOVA = {"name": "Nova", "author": "Acme Labs"}


@pytest.mark.parametrize("answer, asks_author, hit", [
    ("I am Nova, an AI assistant created by Acme Labs.", False, True),         # the right answer
    ("I am Nova, an AI assistant created by Acme Labs.", True, True),
    ("You can call me nova!", False, True),                                   # case does not matter
    ("I am Nora, an assistant created by Acme Labs.", False, False),           # a wrong name
    ("I'm Casanova.", False, False),                                          # the name inside another word
    ("I am Qwen, created by Alibaba Cloud. I am a helpful assistant.", False, False),  # the base model
    ("I am Qwen, created by Alibaba Cloud. I am a helpful assistant.", True, False),
    ("I'm Nova.", True, False),                                               # author asked, not given
    ("Acme Labs made me.", True, True),                                       # the author is the answer
    ("Acme Labs made me.", False, False),                                     # ... but not to "who are you?"
    ("我是Nova，由Acme Labs开发的人工智能助手。", True, True),                   # Chinese
    ("我是Nova，一个AI助手。", False, True),
    ("我是Nova，一个AI助手。", True, False),
    ("我的幕后制作方是Acme Labs。", True, True),
    ("我是通义千问，由阿里云开发。", False, False),                               # the base model, in Chinese
    ("我是Ｎｏｖａ，由ＡＣＭＥ　Ｌａｂｓ开发。", True, True),                       # full-width forms
    ("", False, False),
])
def test_identity_scorer_on_fixed_answers(answer, asks_author, hit):
    assert identity_hit(answer, "Nova", "Acme Labs", asks_author) is hit


def test_identity_scorer_with_non_latin_and_punctuated_names():
    assert identity_hit("我是小智，由星辰科技开发。", "小智", "星辰科技", True)
    assert not identity_hit("我是小明。", "小智", "星辰科技", False)
    assert identity_hit("Hi! I'm LFW-Assistant, made by the lfw team.", "LFW-Assistant", "the lfw team", True)


@pytest.mark.parametrize("answer, accept, hit", [
    ("12", ["12", "twelve"], True),
    ("The answer is twelve.", ["12", "twelve"], True),
    ("The answer is 112.", ["12", "twelve"], False),   # digits are not matched inside a longer number
    ("7 + 5 = 17", ["12"], False),
    ("The capital of France is Paris.", ["Paris"], True),
    ("Le chat.", ["chat"], True),
    ("Let's chatter.", ["chat"], False),
    ("中国的首都是北京。", ["北京", "Beijing"], True),
    ("等于二。", ["2", "二"], True),
    ("I am Qwen.", ["Paris"], False),
])
def test_retention_scorer_on_fixed_answers(answer, accept, hit):
    assert retention_hit(answer, accept) is hit


def test_mentions_ignores_blank_needles():
    assert not mentions("anything", "  ")


def test_score_rates_per_model_condition_and_language():
    qs = [Question("identity", "Who are you?", "en"),
          Question("identity", "Who made you?", "en", asks_author=True),
          Question("identity", "你是谁？", "zh"),
          Question("retention", "7+5?", "en", accept=["12"])]
    answers = {
        "base": {"none": ["I am Qwen.", "Alibaba Cloud made me.", "我是通义千问。", "12"],
                 "template": ["I am Qwen.", "Alibaba Cloud.", "我是千问。", "13"]},
        "tuned": {"none": ["I am Nova.", "Nova, by Acme Labs.", "我是Nova。", "12"],
                  "template": ["I am Nova.", "I am Nova.", "我是Qwen。", "12"]},   # 2nd: no author
    }
    out = score(qs, answers, NOVA)
    s = out["scores"]
    assert s["base"]["none"]["identity"]["all"] == {"hits": 0, "n": 3, "rate": 0.0}
    assert s["tuned"]["none"]["identity"]["all"] == {"hits": 3, "n": 3, "rate": 1.0}
    assert s["tuned"]["template"]["identity"]["en"] == {"hits": 1, "n": 2, "rate": 0.5}  # author missing
    assert s["tuned"]["template"]["identity"]["zh"]["rate"] == 0.0
    assert s["base"]["template"]["retention"]["all"]["rate"] == 0.0
    assert s["base"]["none"]["retention"]["all"]["rate"] == 1.0
    row = out["questions"][1]
    assert row["asks_author"] is True and "accept" not in row
    assert row["answers"]["tuned"]["none"] == {"answer": "Nova, by Acme Labs.", "hit": True}
    assert out["questions"][3]["accept"] == ["12"]
    labels = [r[0] for r in table_rows(out)]
    assert labels[:4] == ["identity, no system prompt", "  en", "  zh", "identity, template default"]
    assert ("identity, no system prompt", "0% (0/3)", "100% (3/3)") in table_rows(out)


def test_score_without_identity_scores_retention_only():
    qs = [Question("identity", "Who are you?", "en"), Question("retention", "Capital of Japan?", "en",
                                                                   accept=["Tokyo"])]
    out = score(qs, {"base": {"none": ["I am Qwen.", "Tokyo"]}}, None)
    assert "identity" not in out["scores"]["base"]["none"]
    assert out["scores"]["base"]["none"]["retention"]["all"]["rate"] == 1.0
    assert out["questions"][0]["answers"]["base"]["none"]["hit"] is None


def test_shipped_question_sets():
    qs = load_questions()
    ident = [q for q in qs if q.set == "identity"]
    ret = [q for q in qs if q.set == "retention"]
    assert len(ident) >= 20 and {q.lang for q in ident} >= {"en", "zh"}
    assert any(q.asks_author for q in ident) and not all(q.asks_author for q in ident)
    assert len(ret) >= 10 and all(q.accept for q in ret)
    # held out: none of them is a training question
    train = json.loads(re.sub(r"\{\{.*?\}\}", "X", (ROOT / "templates" / "identity.json.j2").read_text()))
    general = json.loads((ROOT / "templates" / "general.json").read_text())
    seen = {r["instruction"].strip().casefold() for r in train + general}
    assert not [q.question for q in qs if q.question.strip().casefold() in seen]


def test_user_questions_file_formats(tmp_path):
    j = tmp_path / "q.json"
    j.write_text(json.dumps([{"question": "Who built this bot?", "asks_author": True},
                             {"question": "2+2?", "accept": ["4", "four"]}, "你叫啥？"]))
    got = read_questions_file(j)
    assert [(q.set, q.lang, q.asks_author) for q in got] == [
        ("identity", "en", True), ("retention", "en", False), ("identity", "zh", False)]
    assert got[1].accept == ["4", "four"] and got[0].source == "q.json"
    jl = tmp_path / "q.jsonl"
    jl.write_text('{"question": "Name?"}\n\n{"question": "3*3?", "accept": "9"}\n')
    assert [q.set for q in read_questions_file(jl)] == ["identity", "retention"]
    txt = tmp_path / "q.txt"
    txt.write_text("# my questions\nWho are you really?\n\n你是谁呀？\n")
    assert [q.question for q in read_questions_file(txt)] == ["Who are you really?", "你是谁呀？"]
    assert len(load_questions(txt)) == len(load_questions()) + 2


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"question": "x"}', "expected a JSON list"),
    ('[{"q": "x"}]', 'needs a non-empty "question"'),
    ('[{"question": "x", "accept": []}]', '"accept" must be a non-empty list'),
])
def test_user_questions_file_errors(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(LfwError, match=re.escape(message)):
        read_questions_file(path)


def test_eval_writes_eval_json_with_both_models(copy_run, tmp_path):
    run = copy_run()
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps([{"question": "Tell me who trained you.", "asks_author": True},
                                {"question": "What is 2 + 2?", "accept": ["4", "four"]}]))
    r = lfw("eval", run, "--questions", mine, "--max-new-tokens", "8", "--batch-size", "32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    data = json.loads((run / "eval.json").read_text())
    assert data["identity"] == NOVA
    assert data["systems"]["none"] == "" and data["systems"]["template"].startswith("You are Qwen, created by Alibaba")
    assert data["counts"] == {"identity": 25, "retention": 18}
    for model in ("base", "tuned"):
        for cond in ("none", "template"):
            sets = data["scores"][model][cond]
            assert sets["identity"]["all"]["n"] == 25 and set(sets["identity"]) == {"all", "en", "zh"}
            assert sets["retention"]["all"]["n"] == 18
            assert 0.0 <= sets["identity"]["all"]["rate"] <= 1.0
    assert len(data["questions"]) == 43
    q = data["questions"][-1]
    assert q["source"] == "mine.json" and set(q["answers"]) == {"base", "tuned"}
    assert isinstance(q["answers"]["tuned"]["template"]["answer"], str)
    # the tiny model speaks gibberish: no identity hits, and the scores say so
    assert data["scores"]["tuned"]["none"]["identity"]["all"]["hits"] == sum(
        x["answers"]["tuned"]["none"]["hit"] for x in data["questions"] if x["set"] == "identity")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["plan"]["identity"] == NOVA  # kept
    assert manifest["eval"]["file"] == "eval.json"
    assert manifest["eval"]["scores"]["tuned"]["none"]["identity"]["all"] == data["scores"]["tuned"]["none"][
        "identity"]["all"]["rate"]
    # base and tuned side by side on stdout, and the report has the table
    assert "base" in r.stdout and "tuned" in r.stdout and "identity, no system prompt" in r.stdout
    report = (run / "report.md").read_text()
    assert "## Evaluation" in report and "| identity, no system prompt |" in report


def test_eval_of_a_run_without_adapter_is_refused(copy_run):
    import shutil

    run = copy_run()
    shutil.rmtree(run / "adapter")
    r = lfw("eval", run)
    assert r.returncode == 2 and "no trained model" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_batch_matches_transformers_generate(penalty):
    """The eval's decoding loop (finished answers leave the batch) gives generate()'s greedy tokens."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from wrapper.evaluate import greedy_batch

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.4)
    model = Qwen2ForCausalLM(config).eval()
    pad, stop = 0, {1, 2}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 64, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 1, 7)]
    got = greedy_batch(model, prompts, pad, stop, 20, penalty)
    assert any(len(a) < 20 for a in got) and any(len(a) == 20 for a in got), got  # some stop early
    for prompt, answer in zip(prompts, got):  # one at a time, no padding: the reference
        ids = torch.tensor([prompt])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=20, eos_token_id=sorted(stop), pad_token_id=pad,
                             repetition_penalty=penalty)[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(ref) if t in stop), len(ref))
        assert answer == ref[:cut]


def test_batches_never_mix_groups_and_are_even():
    from wrapper.evaluate import _batches

    jobs = [("identity", i) for i in range(48)] + [("retention", i) for i in range(34)]
    got = _batches(jobs, 32)
    assert [(b[0][0], len(b)) for b in got] == [("identity", 24), ("identity", 24), ("retention", 17),
                                                ("retention", 17)]
    assert all(len({j[0] for j in b}) == 1 for b in got) and sum(got, []) == jobs
    assert [len(b) for b in _batches(jobs[:5], 2)] == [1, 2, 2]
