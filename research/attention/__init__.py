"""Attention: RoPE, the attention arithmetic behind ``attention_impl`` (ops), MLA and X-EcoMLA upcycling."""
