"""The API generations the proxy serves, side by side, from one hub.

A generation is its path (and, after it, ``/state``: the state as JSON), its pure
parameter parser (query -> ``Filters``, in policy.py) and its payload (payloads.py,
chosen through ``Filters.payload``).
Everything else, authentication, limits, the resume cursor, the subscription and the
writer, is one path for all of them (admission.py, stream.py). Both are always
served; ``[api] version`` only decides which one ``GET /`` advertises, and so which
one the official SDK picks (major version <= 4: v4's path; >= 5: ``/events/session``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Final

from .policy import Filters, Principal, resolve_filters, resolve_filters_v5

Parser = Callable[[Principal, Mapping[str, Sequence[str]], frozenset[str]], Filters]


@dataclass(frozen=True, slots=True)
class Generation:
    name: str  # "v4", "v5": the metrics' and logs' label
    path: str
    parse: Parser

    @property
    def state_path(self) -> str:
        """The JSON form of the state, with the stream's filters and payloads."""
        return f"{self.path}/state"


V4: Final = Generation("v4", "/stream/kernel/_/events", resolve_filters)
V5: Final = Generation("v5", "/events/session", resolve_filters_v5)
GENERATIONS: Final = (V4, V5)
STREAM_PATHS: Final = frozenset(g.path for g in GENERATIONS)

DEFAULT_VERSION: Final = "v4.20190615"
_VERSION_RE: Final = re.compile(r"v([4-9])\.(\d{4})(\d{2})(\d{2})")


def check_version(value: str) -> str:
    """An advertised API version: ``vN.YYYYMMDD``, N from 4 to 9, a real date."""
    match = _VERSION_RE.fullmatch(value)
    if match is None:
        raise ValueError("must be vN.YYYYMMDD with N from 4 to 9 (e.g. v7.20230615)")
    try:
        date(int(match[2]), int(match[3]), int(match[4]))
    except ValueError:
        raise ValueError(f"{value[3:]} is not a date") from None
    return value


def major(version: str) -> int:
    return int(check_version(version)[1])


def generation_for(version: str) -> Generation:
    """The path a client that negotiated this version uses (as the SDK decides)."""
    return V4 if major(version) <= 4 else V5
