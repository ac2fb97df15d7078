"""The agent: typed state, the refutation StateGraph, the one-node direct graph, the pipeline
that runs both and fuses, the VLM seam (openai and offline backends) and reply parsing.

    from anomalyclaw.graph.pipeline import build_pipeline
    from anomalyclaw.graph.context import make_context
    from anomalyclaw.graph.state import new_state
    from anomalyclaw.graph.vlm import make_vlm
"""
