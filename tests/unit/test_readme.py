"""The README stays in step with the code: every setting is documented, the two set-up commands lead."""

from __future__ import annotations

from pathlib import Path

from app.settings import ENV_NAMES, SETTINGS
from docs.gen_config_table import current, table

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_environment_variable_and_flag_is_documented():
    missing = [name for names in ENV_NAMES.values() for name in names if f"`{name}`" not in README]
    assert not missing
    flags = [
        option for setting in SETTINGS.values() for option in setting.flags if f"`{option}`" not in README
    ]
    assert not flags


def test_the_configuration_table_is_the_generated_one():
    assert current(README) == table(), "run: .venv/bin/python docs/gen_config_table.py"


def test_the_readme_opens_with_exactly_the_two_setup_commands():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make serve", "make test"]


def test_the_architecture_table_matches_the_architectures_tested():
    from tests.unit.test_text_architectures import ARCHS as TEXT
    from tests.unit.vlm_builders import ARCHS as VISION

    block = README.split("<!-- architectures -->", 1)[1].split("<!-- /architectures -->", 1)[0]
    rows = [line.strip("|").split("|") for line in block.strip().splitlines()[2:]]
    documented = {cells[0].strip().strip("`"): cells[2].strip() for cells in rows}
    tested = {name: path for name, (_, path) in TEXT.items()}
    tested.update({arch.name: arch.path for arch in VISION})
    tested.update({"llama": "fast", "llava": "fast"})  # the built-in demo models (tests/integration)
    assert documented == tested
    assert all(cells[3].strip() for cells in rows), "every row says why"


def test_the_version_is_the_projects():
    import tomllib

    from app.version import VERSION

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert VERSION == pyproject["project"]["version"]
