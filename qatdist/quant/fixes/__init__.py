"""Workarounds for upstream (torch / torchao) behaviour, one module each. Each module opens with
the upstream behaviour it changes and when it can go."""
