import pytest

from devicemap.errors import DeviceMapError
from devicemap.units import first_of, format_size, parse_size, split_assignments


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


def test_assignments_split_into_stripped_pairs_skipping_empty_entries():
    pairs = split_assignments(" 0=24GiB, cpu = 64GiB ,,", key="DEVICE", example="0=24GiB")
    assert pairs == [("0", "24GiB"), ("cpu", "64GiB")]


@pytest.mark.parametrize("bad", ["0:24GiB", "cpu=", "=5GB"])
def test_an_assignment_without_key_or_size_is_an_error_quoting_it_with_the_expected_form(bad):
    with pytest.raises(DeviceMapError, match=f"{bad!r} is not RANK=SIZE; write e.g. '0=8GiB'"):
        split_assignments(f"1=2GiB,{bad}", key="RANK", example="0=8GiB")


def test_a_long_list_of_names_shows_the_first_few_and_counts_the_rest():
    assert first_of(["a", "b"], 2) == "a, b"
    assert first_of([f"layer.{i}" for i in range(12)], 3) == "layer.0, layer.1, layer.2 … and 9 more"
