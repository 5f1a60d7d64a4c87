import pytest

from devicemap.errors import DeviceMapError
from devicemap.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10GiB", 10 * 2**30),
        ("10GB", 10 * 10**9),
        ("500MiB", 500 * 2**20),
        ("1.5TB", 1_500_000_000_000),
        ("10 gib", 10 * 2**30),
        (" 2 KB ", 2000),
        ("4096", 4096),
        ("123b", 123),
        (7, 7),
    ],
)
def test_sizes_parse_in_any_case_with_spaces(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["ten GiB", "10 GiBs", "1.2.3GB", "", "GiB", "-5GB", "0", 0, -1, 1.5, None, True])
def test_a_size_that_is_not_a_positive_amount_is_an_error_quoting_the_input(bad):
    with pytest.raises(DeviceMapError) as error:
        parse_size(bad)
    assert repr(bad) in str(error.value)


def test_sizes_format_in_binary_units():
    assert format_size(512) == "512 B"
    assert format_size(int(131.4 * 2**30)) == "131.4 GiB"
    assert format_size(3 * 2**40) == "3.0 TiB"
    assert format_size(-2**20) == "-1.0 MiB"
