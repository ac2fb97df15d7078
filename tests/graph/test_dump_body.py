"""Request bodies are serialised with orjson: the same JSON ``json.dumps`` writes, and a
non-finite number is an error naming where it is (orjson alone would write ``null``)."""
from __future__ import annotations

import base64
import json
import os

import pytest

from anomalyclaw.graph.vlm.endpoint import dump_body


def _body(**extra):
    url = "data:image/png;base64," + base64.b64encode(os.urandom(3000)).decode()
    return {"model": "fake-vlm", "temperature": 0.0, "max_tokens": 512,
            "messages": [{"role": "system", "content": "Judge by refutation — ünïcode stays UTF-8."},
                         {"role": "user", "content": [{"type": "text", "text": "query \"quoted\"\n\ttab"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "tools": [{"type": "function", "function": {"name": "side_by_side_compare", "parameters": {
                "type": "object", "properties": {"bbox": {"type": ["array", "null"], "items": {"type": "number"}},
                                                 "n_refs": {"type": "integer", "default": 2}}}}}],
            **extra}


def test_the_same_json_as_json_dumps():
    body = _body(top_logprobs=5, logprobs=True, stop=("a", "b"), seed=2**40, top_p=0.95)
    data = dump_body(body)
    assert isinstance(data, bytes)
    assert json.loads(data) == json.loads(json.dumps(body))
    assert data == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_number_names_its_place(bad):
    body = _body()
    body["messages"][1]["content"][0]["weight"] = bad
    with pytest.raises(ValueError, match=r"body\.messages\[1\]\.content\[0\]\.weight"):
        dump_body(body)
    with pytest.raises(ValueError, match=r"body\.temperature"):
        dump_body(_body(temperature=bad))
