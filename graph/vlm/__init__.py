"""The VLM seam and its backends.

- :mod:`.seam`: the protocol the graphs call (:class:`VLM`), its reply, its errors, and the
  typed :class:`RunView` a number-reading backend gets;
- :mod:`.endpoint`: the real clients (``ChatOpenAI`` through LangChain, or the openai SDK) with
  one retry and concurrency discipline;
- :mod:`.offline`: the embedded rule-based stand-in;
- :mod:`.fake_server`: a local OpenAI-compatible test server (a test double beside the real
  clients, as LangChain keeps its fake chat models);
- :mod:`.factory`: :func:`make_vlm`, which picks one.
"""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "seam": ["STAGES", "STAGE_HEADER", "VLM", "BadResponseError", "RunView", "ToolsUnsupportedError", "VLMError",
             "VLMReply", "request_size"],
    "endpoint": ["ChatVLM", "OpenAIVLM", "check_endpoint", "make_chat_model", "make_openai_client"],
    "offline": ["OfflinePolicy", "OfflineVLM"],
    "factory": ["BACKENDS", "make_vlm"],
    "fake_server": ["FakeVLMServer"],
})
