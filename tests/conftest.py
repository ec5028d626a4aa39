"""Fixtures shared by every test tier live in tests/fixtures/, one module per outside part."""

pytest_plugins = [
    "tests.fixtures.cluster",
    "tests.fixtures.registry",
    "tests.fixtures.engines",
    "tests.fixtures.engine_user",
]
