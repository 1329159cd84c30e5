"""collapse-probe: find out why tool-use RL runs collapse, warn before they do, show the skill survives.

Importing the package is cheap: the Trainer callback (which needs transformers) loads on first use.
"""

__version__ = "0.1.0"
__all__ = ["CollapseProbeCallback", "ControlTokenCapture"]


def __getattr__(name: str):
    if name == "CollapseProbeCallback":
        from collapse_probe.integrations.callback import CollapseProbeCallback
        return CollapseProbeCallback
    if name == "ControlTokenCapture":
        from collapse_probe.capture.hooks import ControlTokenCapture
        return ControlTokenCapture
    raise AttributeError(f"module 'collapse_probe' has no attribute {name!r}")
