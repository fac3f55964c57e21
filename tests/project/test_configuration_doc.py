"""docs/configuration.md is generated from the settings model and must not go stale. No servers."""

from __future__ import annotations

import subprocess
import sys

from outbox.core.settings import ENV_PREFIX, SETTING_DOCS, Settings, markdown
from tests.support.paths import REPO

DOC = REPO / "docs" / "configuration.md"
REGENERATE = "python -m outbox.core.settings --markdown > docs/configuration.md"


def test_every_setting_has_a_line_of_documentation():
    assert set(SETTING_DOCS) == set(Settings.model_fields)


def test_committed_configuration_doc_is_current():
    assert DOC.read_text() == markdown(), f"docs/configuration.md is stale: run `{REGENERATE}`"


def test_every_variable_is_in_the_doc_once():
    text = DOC.read_text()
    for name in Settings.model_fields:
        assert text.count(f"| `{ENV_PREFIX}{name.upper()}` |") == 1, name


def test_the_generator_runs_as_documented():
    out = subprocess.run([sys.executable, "-m", "outbox.core.settings", "--markdown"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out == DOC.read_text()
