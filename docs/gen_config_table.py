"""Regenerate the configuration table of README.md from the settings' declarations.

    .venv/bin/python docs/gen_config_table.py   # rewrites the table in place

tests/unit/test_readme.py fails when the README's table differs from what this would write.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.settings import SETTINGS, Settings  # noqa: E402

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
    rows = [HEADER, "| --- | --- | --- | --- |"]
    for field, setting in SETTINGS.items():
        options = ", ".join(f"`{o}`" for o in setting.flags) or "—"
        default = "~/.cache/usinc/models" if field == "cache_dir" else _show(getattr(defaults, field))
        accepted = f" ({setting.parse.expected})" if setting.parse.expected else ""
        meaning = (setting.help + accepted).replace("|", "/")
        rows.append(f"| {options} | {' / '.join(f'`{n}`' for n in setting.env)} | `{default}` | {meaning} |")
    rows.append(
        "| `--enable-fa2` / `--disable-fa2` | — | — | Shortcuts for `--attn-impl flash_attention_2` / `sdpa`; win over `--attn-impl` |"
    )
    rows.append(
        "| `--no-enable-prefix-caching` | — | — | Turn prefix caching off; wins over `--enable-prefix-caching` |"
    )
    rows.append("| `--print-config` | — | — | Print the resolved settings (secrets removed) and exit |")
    return "\n".join(rows) + "\n"


def current(readme: str) -> str:
    start, end = readme.index(HEADER), readme.index(END_MARKER)
    return readme[start:end]


def main() -> None:
    path = ROOT / "README.md"
    text = path.read_text()
    path.write_text(text.replace(current(text), table()))


if __name__ == "__main__":
    main()
