"""Durations and sizes as people write them in the organization file (mailyard.units): what
each spelling means, what is refused, and how a value is written back (``mailyard org show``
and the copy of the organization kept in Redis)."""

from __future__ import annotations

import pytest

from mailyard.org import Organization
from mailyard.units import format_duration, format_size, parse_duration, parse_size
from tests.conftest import make_org

# region: durations


@pytest.mark.parametrize(("written", "seconds"), [
    (90, 90.0), (2.5, 2.5), ("90", 90.0), ("90s", 90.0), ("5m", 300.0), ("4h", 14_400.0), ("2d", 172_800.0),
    ("250ms", 0.25), ("1.5h", 5400.0), (" 10 M ", 600.0), ("2D", 172_800.0), ("0", 0.0),
])
def test_a_duration_is_seconds_with_an_optional_unit(written: object, seconds: float) -> None:
    assert parse_duration(written) == seconds


@pytest.mark.parametrize("written", ["", "soon", "5 weeks", "1w", "-5m", "5m30s", "m", None, [5], True, False])
def test_anything_else_is_not_a_duration(written: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(written)


def test_a_negative_number_of_seconds_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-1)


@pytest.mark.parametrize(("seconds", "written"), [
    (172_800, "2d"), (86_400 * 30, "30d"), (14_400, "4h"), (300, "5m"), (90, "90s"), (1, "1s"),
    (0.25, "250ms"), (1.5, "1.5s"), (0, "0ms"),
])
def test_a_duration_is_written_in_the_largest_unit_that_divides_it(seconds: float, written: str) -> None:
    assert format_duration(seconds) == written


@pytest.mark.parametrize("seconds", [0, 0.2, 0.25, 1, 1.5, 59, 90, 3601, 7200, 172_800, 2_592_000])
def test_a_written_duration_reads_back_as_the_same_value(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.xfail(strict=True, reason="format_duration keeps six significant digits (f'{x:g}s') and whole "
                   "milliseconds: 0.0025 is written 2ms, 12.3456789 as 12.3457s, and 1234567.5 as '1.23457e+06s', "
                   "which parse_duration refuses")
@pytest.mark.parametrize("seconds", [0.0025, 12.3456789, 1_234_567.5])
def test_every_duration_that_parses_is_written_so_that_it_reads_back_the_same(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.xfail(strict=True, reason="a duration such as lease_time = 1234567.5 passes load_org, but the JSON "
                   "copy org apply stores in Redis (Organization.to_json) writes it '1.23457e+06s', which "
                   "Organization.from_json refuses: every node then fails to read the organization")
def test_an_organization_that_validates_reads_back_from_its_own_json() -> None:
    org = make_org(lease_time=1_234_567.5)
    assert Organization.from_json(org.to_json()).transport.lease_time == 1_234_567.5


# endregion

# region: sizes


@pytest.mark.parametrize(("written", "size"), [
    (1_048_576, 1_048_576), ("512", 512), ("512b", 512), ("64KB", 65_536), ("10MB", 10_485_760),
    ("2GB", 2_147_483_648), ("1.5MB", 1_572_864), (" 10 mb ", 10_485_760), ("0", 0),
])
def test_a_size_is_bytes_with_an_optional_binary_unit(written: object, size: int) -> None:
    assert parse_size(written) == size


@pytest.mark.parametrize("written", ["", "big", "10 MiB", "1TB", "-1KB", "10M", None, True, 1.5])
def test_anything_else_is_not_a_size(written: object) -> None:
    with pytest.raises(ValueError):
        parse_size(written)


def test_a_negative_number_of_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


@pytest.mark.parametrize(("size", "written"), [
    (10_485_760, "10MB"), (2_147_483_648, "2GB"), (65_536, "64KB"), (1536, "1536B"), (1, "1B"), (0, "0B"),
])
def test_a_size_is_written_in_the_largest_unit_that_divides_it(size: int, written: str) -> None:
    assert format_size(size) == written


@pytest.mark.parametrize("size", [0, 1, 1000, 1024, 1536, 10_485_760, 3 * 1024**3 + 1])
def test_a_written_size_reads_back_as_the_same_value(size: int) -> None:
    assert parse_size(format_size(size)) == size


# endregion
