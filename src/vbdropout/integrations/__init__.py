"""Optional integrations with other frameworks.

Each submodule imports its framework on import and says which extra to install
when it is missing; importing :mod:`vbdropout` or this package needs none of them.

- :mod:`vbdropout.integrations.lightning` — PyTorch Lightning
  (``pip install "vbdropout[lightning]"``).
"""
