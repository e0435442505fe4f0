"""The paper's tables as data (:mod:`.tables`) and the runner that reproduces them."""

from .reproduce import reproduce
from .tables import TABLES

__all__ = ["TABLES", "reproduce"]
