"""The server's version: one place, read by the OpenAPI document, `GET /version` and the banner
(tests/unit/test_readme.py keeps it equal to pyproject.toml's)."""

VERSION = "0.1.0"
