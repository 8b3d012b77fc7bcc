"""Session-wide test set-up: server fixtures live in tests/fixtures/ and load as plugins."""

from pathlib import Path

_FIXTURES = Path(__file__).parent / "fixtures"
# TODO(lead): make unconditional once both fixture modules have landed.
pytest_plugins = [
    f"tests.fixtures.{name}"
    for name in ("seaweedfs", "mlflow_server")
    if (_FIXTURES / f"{name}.py").exists()
]
