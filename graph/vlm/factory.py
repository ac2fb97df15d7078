"""``make_vlm``: the backend for a name (``offline`` or ``openai``), or any LangChain chat model."""
from __future__ import annotations

from langchain_core.language_models import BaseChatModel

from anomalyclaw.config import EndpointConfig
from anomalyclaw.errors import AnomalyClawError

from .endpoint import ChatVLM, OpenAIVLM, make_chat_model
from .offline import OfflineVLM
from .seam import VLM

BACKENDS = ("offline", "openai")


def make_vlm(backend: str = "offline", endpoint: EndpointConfig | None = None, *,
             max_concurrency: int = 8, chat_model: BaseChatModel | None = None) -> VLM:
    """The VLM for a backend: ``offline`` (the embedded rule-based stand-in) or ``openai``.

    Pass ``chat_model`` to use any LangChain chat model behind the same seam; its retries,
    concurrency bound and timeouts come from ``endpoint`` when given.
    """
    if chat_model is not None:
        name = getattr(chat_model, "model_name", None) or getattr(chat_model, "model", None) or type(chat_model).__name__
        policy = endpoint or EndpointConfig()
        return ChatVLM(model=str(name), backend="langchain", chat_model=chat_model,
                       max_retries=policy.max_retries, backoff_max_s=policy.backoff_max_s,
                       max_concurrency=max_concurrency, timeout_s=policy.timeout_s, secrets=policy.secret_values())
    if backend == "offline":
        return OfflineVLM(max_concurrency=max_concurrency)
    if backend == "openai":
        endpoint = (endpoint or EndpointConfig.from_env()).require()
        policy = dict(model=endpoint.model or "unknown", backend="openai", max_retries=endpoint.max_retries,
                      backoff_max_s=endpoint.backoff_max_s, max_concurrency=max_concurrency,
                      timeout_s=endpoint.timeout_s, secrets=endpoint.secret_values(), base_urls=endpoint.base_urls,
                      rest_after=endpoint.rest_after, down_after_s=endpoint.down_after_s)
        if endpoint.client == "sdk":
            return OpenAIVLM(endpoint=endpoint, **policy)
        return ChatVLM(chat_model=make_chat_model(endpoint), endpoint=endpoint, **policy)
    raise AnomalyClawError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
