"""Boolean command-line options given as text (python-fire passes ``--progress false`` as a string)."""

import pytest

from anatomy_vlp_bundle.options import as_flag


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("False", False),
                                             ("1", True), ("0", False), ("yes", True), (" no ", False), (1, True)])
def test_text_and_bool_values_are_read(value, expected):
    assert as_flag(value, "progress", "transfer") is expected


def test_other_text_is_refused_naming_the_command_and_option():
    with pytest.raises(ValueError, match=r"transfer: progress must be true or false, got 'maybe'"):
        as_flag("maybe", "progress", "transfer")
