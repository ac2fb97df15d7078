"""Showing a run: the HTML report, ROC curves and per-domain bars, and one item's trace."""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "html": ["build_report", "draw_localization"],
    "plots": ["plot_domain_bars", "plot_roc_curves"],
    "trace": ["format_trace"],
})
