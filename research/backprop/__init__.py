"""Efficient backprop as custom VJPs: gradient filtering for convolutions, LBP-WHT for linear layers."""
