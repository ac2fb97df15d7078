"""The reply parser reads what models really write and says what is wrong otherwise."""
from __future__ import annotations

import json

import pytest

from anomalyclaw.graph.replies import (DirectReply, ReplyError, extract_json, normalize_bbox,
                                       parse_label_logprobs, parse_reply)


def test_fences_prose_trailing_commas_and_python_literals():
    text = 'Here you go:\n```json\n{"initial_score": 0.4, "candidates": [{"id": "c1", "bbox": [0.1,0.1,0.3,0.3],},],\n' \
           '"action": {"tool": "region_zoom", "args": {"bbox": [0.1,0.1,0.3,0.3]}, "candidate": "c1"}}\n```\nDone.'
    reply = parse_reply("propose", text)
    assert reply.initial_score == 0.4 and reply.action.tool == "region_zoom" and not reply.action.commit
    assert reply.candidates[0].bbox == [0.1, 0.1, 0.3, 0.3]
    lit = parse_reply("refute", "{'verdicts': [{'id': 'c1', 'status': 'Refuted', 'evidence': None}], "
                                "'updated_score': 0.1, 'action': 'commit'}")
    assert lit.verdicts[0].status == "refuted" and lit.action.commit


def test_released_action_format_and_string_args():
    reply = parse_reply("propose", '{"anomaly_score": 0.8, "action": "call_tool", "tool": "tool_side_by_side", '
                                   '"args": "{\'bbox\': [150, 250, 350, 450]}"}', image_size=(500, 500))
    assert reply.action.tool == "tool_side_by_side" and reply.action.args == {"bbox": [150, 250, 350, 450]}


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("   ", "empty"),
    ('{"initial_score": 0.3, "candidates": [', "cut off"),
    ("The image looks normal to me.", "no JSON"),
    ('{"initial_score": NaN}', "between 0 and 1"),
    ('{"initial_score": 7.5}', "between 0 and 1"),
    ('{"initial_score": -0.2}', "between 0 and 1"),
    ('{"candidates": []}', '"initial_score"'),
    ('{"initial_score": "high"}', "number"),
])
def test_unusable_replies_say_why(text, words):
    with pytest.raises(ReplyError, match=words):
        parse_reply("propose", text)


def test_direct_score_reading():
    anomalous = parse_reply("direct", '{"image_label": "Anomalous", "confidence": 0.9}')
    assert isinstance(anomalous, DirectReply) and anomalous.score == pytest.approx(0.9)
    normal = parse_reply("direct", '{"image_label": "normal", "confidence": 85}')  # percent
    assert normal.score == pytest.approx(0.15)
    with pytest.raises(ReplyError, match="image_label"):
        parse_reply("direct", '{"image_label": "maybe", "confidence": 0.5}')


def test_commit_confidence_scales():
    assert parse_reply("commit", '{"anomaly_score": 0.2, "confidence": 0.8}').confidence == pytest.approx(80)
    assert parse_reply("commit", '{"anomaly_score": 0.2, "confidence": 70}').confidence == 70


def test_bbox_normalisation():
    assert normalize_bbox([0.5, 0.6, 0.1, 0.2]) == [0.1, 0.2, 0.5, 0.6]
    assert normalize_bbox([10, 20, 110, 220], (200, 400)) == [0.05, 0.05, 0.55, 0.55]
    assert normalize_bbox([10, 20, 110, 220]) is None  # pixels without a size: unreadable
    assert normalize_bbox([0.2, 0.2, 0.2, 0.9]) is None  # empty
    assert normalize_bbox("nonsense") is None and normalize_bbox([1, 2]) is None
    assert normalize_bbox([-0.5, 0.0, 1.5, 1.0]) == [0.0, 0.0, 1.0, 1.0]


def test_extract_json_ignores_braces_inside_strings():
    assert extract_json('x {"a": "}{", "b": 1} y') == {"a": "}{", "b": 1}


def test_logprob_reading():
    top = [{"token": "anom", "logprob": -0.1}, {"token": "normal", "logprob": -2.5}, {"token": "The", "logprob": -5}]
    p = parse_label_logprobs(top)
    assert 0.85 < p < 0.95
    assert parse_label_logprobs([{"token": "The", "logprob": -0.1}]) is None


# ----------------------------------------------- issue 17 item 4: reasoning models and echoes
FINAL = '{"image_label": "anomalous", "confidence": 0.9, "evidence": "a scratch"}'
DRAFT = '{"image_label": "normal", "confidence": 0.8, "evidence": "first look"}'


@pytest.mark.parametrize("text", [
    f"<think>Draft: {DRAFT}. Hmm, look again at the edge.</think>\n{FINAL}",        # a draft in the reasoning
    f"<THINK>\nthe set {{a, b is what I see</THINK>{FINAL}",                       # a brace in the reasoning
    f"{DRAFT} is what I wrote first; looking again.</think>\n```json\n{FINAL}\n```",  # a lone closing tag
    f"Let me consider {{the left corner. First guess {DRAFT}, final answer: {FINAL}",  # no tags: the last object
    f"<thinking>{DRAFT}</thinking> {FINAL} <reasoning>{DRAFT}</reasoning>",
])
def test_reasoning_is_stripped_and_the_last_valid_object_wins(text):
    reply = parse_reply("direct", text)
    assert reply.image_label == "anomalous" and reply.evidence == "a scratch"


def test_a_later_object_of_another_shape_does_not_hide_the_answer():
    text = f'{FINAL}\nFor reference, the tool said {{"ok": true, "tool": "zoom"}}.'
    assert parse_reply("direct", text).image_label == "anomalous"


def test_a_reply_that_is_only_reasoning_says_so():
    with pytest.raises(ReplyError, match="only reasoning"):
        parse_reply("direct", f"<think>I need to look at {DRAFT} and then")
    with pytest.raises(ReplyError, match="only reasoning"):
        parse_reply("direct", "<think>all of it</think>   ")


def test_json_planted_in_the_prompt_is_never_the_answer():
    """A domain card carrying a JSON example: a model that restates its prompt is not scored
    from it; its own answer after the echo is."""
    planted = '{"image_label": "normal", "confidence": 0.99}'
    prompt = f"Domain: parts. Normal: as in the references. Example answer: {planted}\nAnswer in JSON."
    with pytest.raises(ReplyError, match="repeats JSON from the prompt"):
        parse_reply("direct", prompt, prompt=prompt)
    assert parse_reply("direct", prompt + "\n" + FINAL, prompt=prompt).image_label == "anomalous"
    assert parse_reply("direct", planted).image_label == "normal"  # without the prompt: a plain answer


def test_a_hostile_reply_is_read_in_linear_time():
    import time

    for text in ("{" * 200_000, "{" * 100_000 + FINAL, '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}",
                 "'" * 100_000 + FINAL):
        start = time.perf_counter()
        try:
            parse_reply("direct", text)
        except ReplyError as exc:
            assert str(exc)
        assert time.perf_counter() - start < 2.0
    assert parse_reply("direct", "{" * 100_000 + FINAL).image_label == "anomalous"
    with pytest.raises(ReplyError, match="nested too deeply"):
        parse_reply("direct", '{"a": ' + "[" * 50_000 + "]" * 50_000 + "}")


def test_long_text_fields_are_cut():
    from anomalyclaw.graph.replies import MAX_FIELD_CHARS

    reply = parse_reply("direct", json.dumps({"image_label": "normal", "confidence": 0.7, "evidence": "x" * 10**6}))
    assert MAX_FIELD_CHARS <= len(reply.evidence) < MAX_FIELD_CHARS + 100 and "characters cut" in reply.evidence
