import os

pytest_plugins = ["_labplugin"] if os.path.exists(os.path.join(os.path.dirname(__file__), "_labplugin.py")) else []


def pytest_sessionstart(session) -> None:
    """Scope the leak witness (testutil.host_state) to this session's temp dirs."""
    os.environ["COWDISK_TEST_SCOPE"] = str(session.config._tmp_path_factory.getbasetemp())
