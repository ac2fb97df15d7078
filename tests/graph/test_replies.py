"""The reply parser reads what models really write and says what is wrong otherwise."""
from __future__ import annotations

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
