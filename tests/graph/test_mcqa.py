"""The multiple-choice task: the letter parser, its reply models, the offline policy's reading of
a question, and questions through the local OpenAI-compatible server with the real clients."""
from __future__ import annotations

import json

import pytest

from anomalyclaw.config import AgentConfig, EndpointConfig
from anomalyclaw.graph.context import make_context
from anomalyclaw.graph.pipeline import build_pipeline
from anomalyclaw.graph.replies import ReplyError, parse_reply, read_letter, read_option_scores
from anomalyclaw.graph.state import new_state
from anomalyclaw.graph.vlm import make_vlm
from anomalyclaw.graph.vlm.fake_server import FakeVLMServer, reply_stage
from anomalyclaw.graph.vlm.offline import option_number, option_point, question_kind
from anomalyclaw.items import Question

KINDS = [("A", "Crack."), ("B", "Large crack."), ("C", "Stain."), ("D", "Scratched surface.")]
YES_NO = [("A", "Yes."), ("B", "No.")]


@pytest.mark.parametrize("text, options, letter", [
    ("B", KINDS, "B"), (" (C) ", KINDS, "C"), ("**D**", KINDS, "D"), ("c.", KINDS, "C"),
    ("Answer: B", KINDS, "B"), ("The answer is (A).", KINDS, "A"), ("Correct option: D", KINDS, "D"),
    ("B. a large crack", KINDS, "B"), ("(C) Stain", KINDS, "C"), ("D) scratched", KINDS, "D"),
    ("Large crack", KINDS, "B"),         # the option's text; "crack" alone gives way to the longer match
    ("crack.", KINDS, "A"), ("scratched surface", KINDS, "D"),
    ("No, the bottle is intact.", YES_NO, "B"), ("yes", YES_NO, "A"),
    ('{"answer": "C"}', KINDS, "C"), ("Looking closely, I pick C.", KINDS, "C"),
    ("A scratch-like mark, so D", KINDS, "D"),  # the article "A" is no answer
    ("Question 1: ... Answer: A. Yes.", YES_NO, "A"),
    ("<think>It could be A or B; the mark is long.</think>\nB", KINDS, "B"),  # reasoning is not the answer
])
def test_reads_the_letter_models_write(text, options, letter):
    assert read_letter(text, options) == letter


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("I cannot tell from these images.", "no option letter"),
    ("A or C", "several options"), ("E", "'E' is not one of the options"), ("Answer: E", "not one of the options"),
    ("yes and no", "no option letter"), ("<think>surely C</think>", "only reasoning"),
])
def test_unreadable_letters_say_why(text, words):
    with pytest.raises(ReplyError, match=words):
        read_letter(text, KINDS if "yes" not in text else YES_NO)


def test_mcq_reply_models():
    propose = parse_reply("mcq_propose", '{"answer": null, "action": {"tool": "image_diff", "candidate": "(B)"}}',
                          options=KINDS)
    assert propose.answer is None and propose.action.tool == "image_diff"
    with pytest.raises(ReplyError, match='no "answer"'):
        parse_reply("mcq_propose", '{"answer": null, "action": {"commit": true}}', options=KINDS)
    refute = parse_reply("mcq_refute", '{"verdicts": [{"id": "option A", "status": "refuted"}], "option_scores": '
                                       '{"A": 5, "B": "80%", "Z": 0.3, "C": "high"}, "action": "commit"}',
                         options=KINDS)
    assert refute.answer == "B" and refute.option_scores == {"A": 0.05, "B": 0.8} and refute.verdicts[0].id == "A"
    assert parse_reply("mcq_commit", "Final answer: D", options=KINDS).answer == "D"
    commit = parse_reply("mcq_commit", '```json\n{"answer": "C. Stain", "option_scores": {"C": 0.7}}\n```',
                         options=KINDS)
    assert commit.answer == "C" and commit.option_scores == {"C": 0.7}
    assert parse_reply("mcq_direct", "(A)", options=YES_NO).answer == "A"
    assert read_option_scores("not a dict", KINDS) is None
    with pytest.raises(ValueError, match="needs the question's options"):
        parse_reply("mcq_direct", "A")


def test_offline_reads_a_question_as_a_model_sees_it():
    def q(text, *opts):
        return Question("q", text, tuple(zip("ABCD", opts)))

    assert question_kind(q("Is there any defect in the object?", "No.", "Yes.")) == "yes_no"
    assert question_kind(q("Where is the defect?", "Top left.", "Center.", "Bottom right.")) == "where"
    assert question_kind(q("How many pushpins are there?", "Twelve.", "Fifteen.")) == "count"
    assert question_kind(q("What kind of defect?", "Crack.", "Stain.")) == "which"
    assert option_point("Top right.") == (0.75, 0.25) and option_point("Center.") == (0.5, 0.5)
    assert option_point("A crack.") is None
    assert option_number("12.") == 12 and option_number("eleven coins") == 11 and option_number("many") is None


@pytest.fixture(scope="module")
def questions(small_mmad):
    from anomalyclaw.eval.data.mmad import read_mmad

    contents = read_mmad(small_mmad)
    image = next(im for im in contents.images if im.item.label == 1 and im.item.domain_code.startswith("S2"))
    return image.item, {q.question_type: q for q in image.questions}


@pytest.fixture(params=["langchain", "sdk"])
def client(request):
    return request.param


def _vlm(server, client):
    endpoint = EndpointConfig.from_env(base_url=server.base_url, model="fake-vlm", api_key="sk-test-mcqa",
                                       timeout_s=5.0, max_retries=2, backoff_max_s=0.05, client=client)
    return make_vlm("openai", endpoint, max_concurrency=4)


async def _answer(item, question, vlm):
    ctx = make_context(item, vlm, config=AgentConfig(), question=question.question)
    return await build_pipeline(task="mcqa").ainvoke(new_state(question.question_id), context=ctx)


async def test_a_question_through_the_local_endpoint(questions, client):
    item, by_type = questions
    question = by_type["Defect Localization"]
    with FakeVLMServer(api_key="sk-test-mcqa", record_bodies=True) as server:
        state = await _answer(item, question, _vlm(server, client))
    letters = question.question.letters
    assert state["direct_answer"] in letters and state["refute_answer"] in letters
    assert state["mcq_answer"] == {"direct": state["direct_answer"], "refute": state["refute_answer"]}
    assert state["tools_used"] == ["side_by_side_compare"]  # the default propose tests an option with a tool
    assert server.stats.stages == {"mcq_direct": 1, "mcq_propose": 1, "mcq_refute": 1}
    for body in server.bodies:
        text = json.dumps(body["messages"])
        assert question.question.text in text and "Top left." in text
        assert question.question_type not in text  # MMAD's type is the scorer's, never the model's
        assert reply_stage(body) in ("mcq_direct", "mcq_propose", "mcq_refute")  # also without the header
    direct = next(b for b in server.bodies if reply_stage(b) == "mcq_direct")
    last = direct["messages"][-1]["content"]
    assert [p["type"] for p in last].count("image_url") == 2  # 1 template + the query
    assert last[-1]["type"] == "text" and "letter of one option" in last[-1]["text"]


async def test_repair_then_an_unparseable_answer(questions):
    item, by_type = questions
    question = by_type["Defect Localization"]
    script = {"mcq_direct": ["I would say it is hard to tell.", "no idea at all", "still unsure"],
              "mcq_propose": ['{"answer": null, "action": {"commit": true}}', '{"answer": "(C)", "action": "commit"}'],
              "mcq_commit": []}
    with FakeVLMServer(api_key="sk-test-mcqa", script=script, record_bodies=True) as server:
        state = await _answer(item, question, _vlm(server, "langchain"))
    assert state["direct_answer"] is None and "gave no option letter" in state["direct_error"]
    repair = [b for b in server.bodies if reply_stage(b) == "mcq_direct"][1]["messages"][-1]["content"]
    assert "could not be used: the reply gives no option letter" in repair and "JSON" not in repair
    # propose committed without an answer: repaired, then the letter stands (no commit call needed)
    assert state["refute_answer"] == "C" and any("repaired after" in f for f in state["fallbacks"])
    assert server.stats.stages["mcq_propose"] == 2 and "mcq_commit" not in server.stats.stages


async def test_offline_answers_every_question(questions):
    item, by_type = questions
    vlm = make_vlm("offline")
    from anomalyclaw.tools.item_context import ItemContext

    shared = ItemContext(item)
    for qtype, question in by_type.items():
        ctx = make_context(shared, vlm, question=question.question)
        state = await build_pipeline(task="mcqa").ainvoke(new_state(question.question_id), context=ctx)
        assert state["direct_answer"] in question.question.letters, qtype
        assert state["refute_answer"] in question.question.letters, qtype
    assert shared.has_expert_result("anomaly_vfm")  # one fit and one reading served every question
