"""Session-wide test set-up: server fixtures live in tests/fixtures/ and load as plugins."""

pytest_plugins = ["tests.fixtures.seaweedfs", "tests.fixtures.mlflow_server"]
