"""Route handlers. GET routes answer HEAD too (probes and uptime checkers send it)."""

from __future__ import annotations

from functools import partial

from litestar import HttpMethod, route

get_or_head = partial(route, http_method=[HttpMethod.GET, HttpMethod.HEAD])
