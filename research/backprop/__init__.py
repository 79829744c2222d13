"""Efficient backprop as custom VJPs: gradient filtering for convolutions, LBP-WHT for linear layers.

    from research.backprop import enable_gradient_filter, enable_lbp_wht
"""
from research.backprop.apply import enable_gradient_filter, enable_lbp_wht, layer_params_filter, select_layers, trace_layers

__all__ = ["enable_gradient_filter", "enable_lbp_wht", "layer_params_filter", "select_layers", "trace_layers"]
