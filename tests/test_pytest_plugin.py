"""The pytest plugin: `--session-monitor` fails the tests that leave a session or connection
unclosed, and nothing else; without the option a suite runs exactly as before.

Each case runs a small sample suite in a subprocess, as a user's suite would run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import POSTGRES_ENV
from sqlalchemy.engine import make_url

from session_monitor.state.naming import pool_name_for

pytest_plugins = ["pytester"]

ENGINE_CONFTEST = """
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("db") / "app.db"
    engine = create_engine(
        f"sqlite:///{path}", poolclass=QueuePool, connect_args={"check_same_thread": False}
    )
    with engine.begin() as connection:  # opened by a session-scoped fixture: its own business
        connection.execute(text("create table item (id integer primary key, name text)"))
    held = engine.connect()  # held for the whole run on purpose
    yield engine
    held.close()
    engine.dispose()
"""

LEAKY_TESTS = """
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

HELD = []


def test_session_left_open(engine):
    session = Session(engine)
    session.execute(text("select 1"))  # opens: session_left_open
    HELD.append(session)


def test_connection_left_open(engine):
    HELD.append(engine.connect())  # opens: connection_left_open


def test_session_dropped(engine):
    session = Session(engine)
    session.execute(text("select 1"))  # opens: session_dropped


@pytest.fixture
def forgetful_session(engine):
    session = Session(engine)
    session.execute(text("select 1"))  # opens: fixture_session
    yield session


def test_leak_in_function_fixture(forgetful_session):
    forgetful_session.execute(text("select 2"))


@pytest.fixture
def cleanup_that_forgets(engine):
    yield
    HELD.append(engine.connect())  # opens: fixture_teardown


def test_leak_in_fixture_teardown(cleanup_that_forgets):
    pass
"""

LEAKS = {
    "test_session_left_open": "session_left_open",
    "test_connection_left_open": "connection_left_open",
    "test_session_dropped": "session_dropped",
    "test_leak_in_function_fixture": "fixture_session",
    "test_leak_in_fixture_teardown": "fixture_teardown",
}

CLEAN_TESTS = """
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, scoped_session, sessionmaker

HELD = []


def test_with_blocks(engine):
    with Session(engine) as session:
        session.execute(text("select 1"))
    with engine.connect() as connection:
        connection.execute(text("select 1"))
    with engine.begin() as connection:
        connection.execute(text("insert into item (name) values ('a')"))


@pytest.fixture
def db(engine):
    SessionLocal = sessionmaker(bind=engine)

    def get_db():
        db = SessionLocal()
        try:
            yield db
        finally:
            db.close()

    yield from get_db()


def test_get_db_fixture(db):
    assert db.execute(text("select count(*) from item")).scalar_one() >= 0


@pytest.fixture(scope="module")
def module_connection(engine):
    with engine.connect() as connection:
        yield connection


def test_module_connection_first(module_connection):
    module_connection.execute(text("select 1"))


@pytest.fixture
def savepoint_session(engine):
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    transaction.rollback()
    connection.close()


def test_outer_connection_savepoint(savepoint_session):
    savepoint_session.execute(text("insert into item (name) values ('b')"))
    savepoint_session.commit()


@pytest.fixture(scope="module")
def module_session(engine):
    session = Session(engine)  # first used by a test, closed by this fixture
    yield session
    session.close()


def test_lazy_module_session_first(module_session):
    module_session.execute(text("select 1"))


@pytest.mark.session_monitor_allow_leaks
def test_opted_out(engine):
    HELD.append(engine.connect())


def test_fastapi_get_db_override(engine):
    app = FastAPI()
    SessionLocal = sessionmaker(bind=engine)

    def get_db():
        db = SessionLocal()
        try:
            yield db
        finally:
            db.close()

    @app.get("/count")
    def count(db: Session = Depends(get_db)):
        return {"count": db.execute(text("select count(*) from item")).scalar_one()}

    with TestClient(app) as client:
        assert client.get("/count").status_code == 200


@pytest.fixture(scope="module")
def module_session_registry(engine):
    registry = scoped_session(sessionmaker(bind=engine))
    yield registry
    registry.remove()


def test_module_session_registry(module_session_registry):
    module_session_registry.execute(text("select 1"))


@pytest.fixture(scope="module")
def module_cleanup(engine):
    yield
    HELD.append(engine.connect())  # in a module fixture's teardown: that fixture's business


def test_module_cleanup_user(module_cleanup):
    pass


def test_module_connection_second(module_connection):
    module_connection.execute(text("select 1"))


def test_lazy_module_session_second(module_session):
    module_session.execute(text("select 1"))
"""

CLEAN_COUNT = CLEAN_TESTS.count("\ndef test_")


def opening_line(path: Path, marker: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(n for n, line in enumerate(lines, 1) if f"# opens: {marker}" in line)


def erroring_tests(output: str) -> set[str]:
    """The node ids of the short summary's ERROR lines."""
    return set(re.findall(r"^ERROR (\S+::\S+)", output, re.MULTILINE))


def teardown_errors(output: str) -> dict[str, str]:
    """Each "ERROR at teardown of <test>" section's text, by test name."""
    section = re.compile(r"_+ ERROR at teardown of (\w+) _+\n(.*?)(?=\n_{3,} |\n=+ )", re.S)
    return dict(section.findall(output))


def test_fails_only_the_leaking_tests(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENGINE_CONFTEST)
    leaky = pytester.makepyfile(test_leaky=LEAKY_TESTS)
    pytester.makepyfile(test_clean=CLEAN_TESTS)

    result = pytester.runpytest_subprocess("--session-monitor", "-p", "no:cacheprovider")

    output = result.stdout.str()
    result.assert_outcomes(passed=len(LEAKS) + CLEAN_COUNT, errors=len(LEAKS))
    assert erroring_tests(output) == {f"test_leaky.py::{name}" for name in LEAKS}
    sections = teardown_errors(output)
    for name, marker in LEAKS.items():
        opened = f"test_leaky.py:{opening_line(leaky, marker)} in "
        assert opened in sections[name], sections[name]
        assert f"by test_leaky.py::{name}" in sections[name], sections[name]
    assert "session on pool 'app.db' is still open" in sections["test_session_left_open"]
    assert "in test_session_left_open, in the test" in sections["test_session_left_open"]
    assert "Core connection on pool 'app.db' is still open" in sections["test_connection_left_open"]
    assert "session on pool 'app.db' was garbage collected" in sections["test_session_dropped"]
    fixture_leak = sections["test_leak_in_function_fixture"]
    assert "in forgetful_session, in the setup of fixture 'forgetful_session'" in fixture_leak
    assert "@pytest.mark.session_monitor_allow_leaks" in fixture_leak
    teardown_leak = sections["test_leak_in_fixture_teardown"]
    assert "in the teardown of fixture 'cleanup_that_forgets'" in teardown_leak
    # test_opted_out's connection is allowed by its marker, and counted apart.
    assert (
        f"session_monitor: {len(LEAKS) + CLEAN_COUNT} tests checked, 3 sessions and "
        "2 Core connections left unclosed (1 more in tests marked session_monitor_allow_leaks)"
    ) in output.splitlines()


def test_a_clean_run_says_it_checked(pytester: pytest.Pytester) -> None:
    """Without a line of its own a clean run would look the same with the plugin off."""
    pytester.makeconftest(ENGINE_CONFTEST)
    pytester.makepyfile(test_clean=CLEAN_TESTS.replace("HELD.append(engine.connect())\n", "pass\n"))

    result = pytester.runpytest_subprocess("--session-monitor", "-p", "no:cacheprovider", "-q")

    result.assert_outcomes(passed=CLEAN_COUNT)
    result.stdout.fnmatch_lines(
        [
            f"session_monitor: {CLEAN_COUNT} tests checked, 0 sessions and 0 Core connections "
            "left unclosed"
        ]
    )


IDLE_CHECK = """
from session_monitor.hooks import wrappers as _hooks


def test_the_plugin_is_idle(request):
    assert not request.config.getoption("session_monitor")
    assert request.config.pluginmanager.get_plugin("session_monitor.leak_guard") is None
    assert not _hooks._subscribers, "a monitor was built without --session-monitor"
"""


def test_without_the_option_nothing_changes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENGINE_CONFTEST)
    pytester.makepyfile(test_leaky=LEAKY_TESTS, test_idle=IDLE_CHECK)

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    result.assert_outcomes(passed=len(LEAKS) + 1)
    assert "session_monitor" not in result.stdout.str()


STACK_TESTS = """
from sqlalchemy import text
from sqlalchemy.orm import Session

HELD = []


def open_session(engine):
    session = Session(engine)
    session.execute(text("select 1"))  # opens: helper
    return session


def test_leak_through_a_helper(engine):
    HELD.append(open_session(engine))  # opens: caller
"""


def test_stacks_show_every_application_frame(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENGINE_CONFTEST)
    path = pytester.makepyfile(test_stacks=STACK_TESTS)

    result = pytester.runpytest_subprocess("--session-monitor-stacks", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=1, errors=1)
    helper, caller = opening_line(path, "helper"), opening_line(path, "caller")
    result.stdout.fnmatch_lines(
        [
            f"*opened at test_stacks.py:{helper} in open_session, in the test, "
            "by test_stacks.py::test_leak_through_a_helper",
            f'*File "test_stacks.py", line {helper}, in open_session',
            f'*File "test_stacks.py", line {caller}, in test_leak_through_a_helper',
        ]
    )
    assert "__main__.py" not in result.stdout.str(), "pytest's own frames are not the app's"


@pytest.mark.parametrize(
    ("autoload", "conftest_plugins", "args"),
    [
        pytest.param(
            False, False, ["-p", "session_monitor.pytest_plugin"], id="autoload-off-dash-p"
        ),
        # The entry point has loaded the module already: naming it again must not stop pytest
        # with "Plugin already registered under a different name".
        pytest.param(True, False, ["-p", "session_monitor.pytest_plugin"], id="autoload-dash-p"),
        pytest.param(True, True, [], id="autoload-conftest-pytest_plugins"),
    ],
)
def test_every_way_of_loading_it(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    autoload: bool,
    conftest_plugins: bool,
    args: list[str],
) -> None:
    if not autoload:
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins = 'pytest_plugins = ["session_monitor.pytest_plugin"]\n' if conftest_plugins else ""
    pytester.makeconftest(plugins + ENGINE_CONFTEST)
    pytester.makepyfile(test_leaky=LEAKY_TESTS)

    result = pytester.runpytest_subprocess(*args, "--session-monitor", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=len(LEAKS), errors=len(LEAKS))


POSTGRES_CONFTEST = """
import os

import pytest
from sqlalchemy import create_engine


@pytest.fixture(scope="session")
def engine():
    engine = create_engine(os.environ["SESSION_MONITOR_TEST_POSTGRES_URL"])
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def outer_connection(engine):
    with engine.connect() as connection:
        yield connection
"""

POSTGRES_TESTS = """
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

HELD = []


@pytest.fixture
def session(outer_connection):
    transaction = outer_connection.begin()
    session = Session(bind=outer_connection, join_transaction_mode="create_savepoint")
    yield session
    session.close()
    transaction.rollback()


def test_savepoint_session(session):
    session.execute(text("create temporary table t (id int)"))
    session.commit()


def test_connection_left_open(engine):
    HELD.append(engine.connect())  # opens: pg_connection
"""


@pytest.mark.postgres
def test_postgres_outer_connection_and_a_leak(
    pytester: pytest.Pytester, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(POSTGRES_ENV, postgres_url)
    pytester.makeconftest(POSTGRES_CONFTEST)
    path = pytester.makepyfile(test_pg=POSTGRES_TESTS)

    result = pytester.runpytest_subprocess("--session-monitor", "-p", "no:cacheprovider")

    result.assert_outcomes(passed=2, errors=1)
    assert erroring_tests(result.stdout.str()) == {"test_pg.py::test_connection_left_open"}
    result.stdout.fnmatch_lines(
        [
            f"*Core connection on pool {pool_name_for(make_url(postgres_url))!r} is still open*",
            f"*opened at test_pg.py:{opening_line(path, 'pg_connection')} in "
            "test_connection_left_open, in the test, by test_pg.py::test_connection_left_open",
        ]
    )
