"""The example package tests itself with the fixtures p2p-framework offers plugin authors."""

pytest_plugins = ["p2p_framework.testing.fixtures"]
