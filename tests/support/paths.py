"""Where the tests find the repository and keep their dev stack."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_STACK_DIR = REPO / ".outbox" / "test-stack"
TEMPLATE_DB = "outbox_template"
