"""The benchmarks behind ``anomalyclaw bench``: runner throughput against a local endpoint
(``throughput``), the frozen experts' AUROC (``experts``), the tools' evidence and latency
(``tools``), requests and bytes per item with JSON actions against native tool calling
(``toolcalling``), the fusion with and without the expert term (``fusion``), the memory of a long run
(``memory``) and the event-loop CPU per request of each client and transport (``requests``)."""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "throughput": ["BenchPlan", "format_bench", "full_plan", "quick_plan", "run_bench"],
    "experts": ["run_expert_benchmark"],
    "tools": ["evaluate_tools", "run_tool_benchmark"],
    "toolcalling": ["format_tool_calling", "run_tool_calling_bench"],
    "fusion": ["format_fusion", "run_fusion_benchmark"],
    "memory": ["format_memory", "run_memory_bench"],
    "requests": ["format_requests", "request_cpu"],
})
