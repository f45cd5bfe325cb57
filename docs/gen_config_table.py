"""Regenerate the configuration table of README.md from the settings and the entrypoint flags.

    .venv/bin/python docs/gen_config_table.py   # rewrites the table in place

tests/unit/test_readme.py fails when a setting or flag is missing from the README.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import entrypoint  # noqa: E402
from app.settings import ENV_NAMES, Settings  # noqa: E402

ENV_ONLY_HELP = {
    "hf_token": "Hub token for private or gated models",
    "max_request_body_bytes": "Largest request body; bigger bodies get 413",
    "shutdown_grace_s": "On SIGTERM, time in-flight requests get to finish before replicas stop",
    "max_image_bytes": "Encoded bytes per image (data URL or download)",
    "max_image_pixels": "Decoded pixels per image, checked before decoding",
    "allow_remote_images": "Fetch http(s) image URLs (false: only data URLs)",
    "image_url_allowed_hosts": "Comma-separated host allowlist (`a.com`, `*.b.com`); empty = any public host",
    "allow_private_image_urls": "Turn the image fetcher's private-address check off (trusted networks only)",
    "image_url_allowed_networks": "CIDRs the image fetcher may reach although private (an internal image store)",
    "image_fetch_timeout_s": "Whole image fetch deadline (DNS, connect, redirects, body)",
}
HEADER = "| flag | environment | default | meaning |"
END_MARKER = "\nSet by the entrypoint when absent"


def _show(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "empty"
    return str(value)


def table() -> str:
    defaults = Settings()
    flags = {flag.field: flag for flag in entrypoint.FLAGS}
    rows = [HEADER, "| --- | --- | --- | --- |"]
    for field, names in ENV_NAMES.items():
        flag = flags.get(field)
        options = ", ".join(f"`{o}`" for o in flag.options) if flag else "—"
        default = "~/.cache/usinc/models" if field == "cache_dir" else _show(getattr(defaults, field))
        meaning = (flag.help if flag else ENV_ONLY_HELP.get(field, "")).replace("|", "/")
        rows.append(f"| {options} | {' / '.join(f'`{n}`' for n in names)} | `{default}` | {meaning} |")
    rows.append("| `--enable-fa2` / `--disable-fa2` | — | — | Shortcuts for `--attn-impl flash_attention_2` / `sdpa`; win over `--attn-impl` |")
    rows.append("| `--no-enable-prefix-caching` | — | — | Turn prefix caching off; wins over `--enable-prefix-caching` |")
    rows.append("| `--print-config` | — | — | Print the resolved settings (secrets removed) and exit |")
    return "\n".join(rows) + "\n"


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(HEADER), text.index(END_MARKER)
    readme.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    main()
