"""The plugin by which CI turns a suite it counts on that did not run into a red run
(tests/required_suites.py), run on small suites of its own with pytester."""

import pytest

from required_suites import ENVIRONMENT

SUITES = {
    "test_needed": "def test_one():\n    pass\n\ndef test_two():\n    pass\n",
    "test_other": "import pytest\n\n@pytest.mark.skip(reason='not counted on')\ndef test_skips():\n    pass\n",
}


@pytest.fixture
def suites(pytester, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT, raising=False)  # CI sets it for the run around this one
    pytester.makepyfile(**SUITES)
    return pytester


def run(pytester, *args):
    return pytester.runpytest("-p", "required_suites", *args)


def test_a_run_whose_required_suites_all_ran_passes_even_where_other_suites_skip(suites):
    result = run(suites, "--require-suites", "test_needed.py")
    assert result.ret == 0
    result.assert_outcomes(passed=2, skipped=1)
    assert "required suite" not in result.stdout.str()


def test_a_skipped_test_of_a_required_suite_turns_the_run_red_and_names_the_suite_and_why(suites):
    suites.makepyfile(test_needed="import pytest\n\ndef test_one():\n    pass\n\n"
                                  "def test_two():\n    pytest.skip('no second uid here')\n")
    result = run(suites, "--require-suites", "test_needed.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["required suite test_needed.py did not run in full: 1 skipped "
                                 "(first: test_needed.py::test_two: no second uid here)"])


def test_a_module_skipped_whole_as_it_is_collected_turns_the_run_red(suites):
    suites.makepyfile(test_needed="import pytest\n\npytest.importorskip('no_such_module_here')\n\n"
                                  "def test_one():\n    pass\n")
    result = run(suites, "--require-suites", "test_needed.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["required suite test_needed.py did not run in full: 1 skipped*no_such_module_here*"])


def test_a_required_suite_deselected_or_missing_turns_the_run_red_one_line_each(suites):
    result = run(suites, "-k", "not test_two", "--require-suites", "test_needed.py,test_missing.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "required suite test_needed.py did not run in full: 1 deselected (first: test_needed.py::test_two)",
        "required suite test_missing.py did not run: no test of it ran*"])


def test_a_run_of_other_suites_alone_is_red_for_the_required_one_it_left_out(suites):
    result = run(suites, "test_other.py", "--require-suites", "test_needed.py")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["required suite test_needed.py did not run: no test of it ran*"])


def test_the_environment_names_the_suites_where_the_command_line_cannot(suites, monkeypatch):
    """How .ci/run requires suites of the README's command, which it runs as the README says it."""
    monkeypatch.setenv(ENVIRONMENT, "test_other.py")
    result = run(suites)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["required suite test_other.py did not run in full: 1 skipped*not counted on*"])
    assert run(suites, "--require-suites", "test_needed.py").ret == 0  # the option wins over the environment


def test_a_folder_is_a_suite_of_every_test_under_it(suites):
    suites.mkpydir("folder")
    suites.path.joinpath("folder", "test_inner.py").write_text("def test_inner():\n    pass\n")
    assert run(suites, "--require-suites", "folder").ret == 0
    assert run(suites, "--require-suites", "folder,./test_needed.py").ret == 0
    assert run(suites, "folder", "--require-suites", "folder/,test_needed.py").ret == pytest.ExitCode.TESTS_FAILED
