"""Exchange Management Shell filters: what they match, and where their errors point."""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mailyard.errors import MailyardError
from mailyard.filters import (
    And,
    Comparison,
    Field,
    FilterError,
    Not,
    Or,
    parse,
)
from mailyard.hub.queue_rows import MESSAGE_FIELDS, QUEUE_FIELDS

QUEUE = {
    "Identity": "HUB1\\contoso.example",
    "DeliveryType": "DnsConnectorDelivery",
    "Status": "Retry",
    "MessageCount": 150,
    "NextHopDomain": "mail.contoso.example",
    "LastError": "451 4.4.0 Primary target IP address responded with: 421 4.2.1 Unable to connect",
    "LastRetryTime": "2026-11-26T10:00:00Z",
    "NextRetryTime": None,
    "Site": "Redmond",
    "NextHopConnector": "Internet",
}

MESSAGE = {
    "Identity": "HUB1\\12\\4211",
    "Queue": "HUB1\\12",
    "FromAddress": "Kim.Akers@Contoso.com",
    "Status": "Retry",
    "Size": 2 * 1024 * 1024,
    "Subject": "It's the Q4 report",
    "DateReceived": "2026-11-26T10:00:00Z",
    "ExpirationTime": None,
    "RetryCount": 3,
    "LastError": None,
    "InternetMessageId": "<abc@contoso.com>",
    "SourceIP": "10.0.0.5",
    "Recipients": ["pat@fabrikam.example", "lee@Contoso.com"],
    "RecipientDomains": ["fabrikam.example", "contoso.com"],
    "Age": 5 * 3600,
    "Site": "Redmond",
}


def queue(text: str, **changes: object) -> bool:
    return parse(text, QUEUE_FIELDS).matches({**QUEUE, **changes})


def message(text: str, **changes: object) -> bool:
    return parse(text, MESSAGE_FIELDS).matches({**MESSAGE, **changes})


def error(text: str, fields: dict[str, Field] = QUEUE_FIELDS) -> FilterError:
    with pytest.raises(FilterError) as info:
        parse(text, fields)
    return info.value


def lines(text: str, fields: dict[str, Field] = QUEUE_FIELDS) -> list[str]:
    return str(error(text, fields)).split("\n")


# --- The examples from Exchange ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "expected"), [(150, True), (101, True), (100, False), (0, False), (None, False)]
)
def test_message_count_greater_than(count: int | None, expected: bool) -> None:
    assert queue("MessageCount -gt 100", MessageCount=count) is expected


def test_status_and_next_hop_like() -> None:
    text = "Status -eq Retry -and NextHopDomain -like '*.example'"
    assert queue(text)
    assert not queue(text, Status="Active")
    assert not queue(text, NextHopDomain="mail.contoso.com")


def test_braces_wrap_the_whole_filter() -> None:
    plain = parse('MessageCount -gt 100 -and Status -eq "Retry"', QUEUE_FIELDS)
    braced = parse('{MessageCount -gt 100 -and Status -eq "Retry"}', QUEUE_FIELDS)
    assert braced.expression == plain.expression
    assert braced.text == '{MessageCount -gt 100 -and Status -eq "Retry"}'
    assert braced.matches(QUEUE)
    assert parse("  { Status -eq Retry }  ", QUEUE_FIELDS).matches(QUEUE)


def test_get_message_from_address_like() -> None:
    assert message('{FromAddress -like "*@contoso.com"}')
    assert not message('{FromAddress -like "*@contoso.com"}', FromAddress="kim@contoso.com.evil")


# --- -and, -or, -not and parentheses -------------------------------------------------------------


def test_and_binds_tighter_than_or() -> None:
    f = parse("Status -eq Active -or Status -eq Retry -and MessageCount -gt 1000", QUEUE_FIELDS)
    assert isinstance(f.expression, Or)
    assert isinstance(f.expression.operands[1], And)
    # Active alone is enough; read left to right (as PowerShell would) it would not be.
    assert f.matches({**QUEUE, "Status": "Active", "MessageCount": 5})
    assert not f.matches({**QUEUE, "Status": "Retry", "MessageCount": 5})
    assert f.matches({**QUEUE, "Status": "Retry", "MessageCount": 5000})


def test_parentheses_override_precedence() -> None:
    text = "(Status -eq Active -or Status -eq Retry) -and MessageCount -gt 1000"
    assert not queue(text, Status="Active", MessageCount=5)
    assert queue(text, Status="Active", MessageCount=5000)
    assert queue(text, Status="Retry", MessageCount=5000)


def test_chains_are_flat() -> None:
    f = parse("MessageCount -gt 1 -and MessageCount -gt 2 -and MessageCount -gt 3", QUEUE_FIELDS)
    assert isinstance(f.expression, And)
    assert len(f.expression.operands) == 3


def test_not_applies_to_the_next_comparison_only() -> None:
    f = parse("-not Status -eq Retry -and MessageCount -gt 100", QUEUE_FIELDS)
    assert isinstance(f.expression, And)
    assert isinstance(f.expression.operands[0], Not)
    assert not f.matches(QUEUE)
    assert f.matches({**QUEUE, "Status": "Active"})
    assert not f.matches({**QUEUE, "Status": "Active", "MessageCount": 1})


def test_not_of_a_group_and_double_not() -> None:
    assert queue("-not (Status -eq Active -or MessageCount -lt 100)")
    assert not queue("-not (Status -eq Retry -or MessageCount -lt 100)")
    assert queue("-not -not Status -eq Retry")


def test_parentheses_without_spaces() -> None:
    assert queue("(Status -eq Retry)-and(MessageCount -gt 100)")
    assert queue("((((Status -eq Retry))))")


# --- Case, quotes and text matching ---------------------------------------------------------------


def test_everything_is_case_insensitive() -> None:
    assert queue("messagecount -GT 100 -AND status -Eq rEtRy -oR SITE -eq x")
    assert queue("NextHopDomain -eq 'MAIL.Contoso.Example'")
    assert queue("NextHopDomain -LIKE '*.EXAMPLE'")
    assert queue("NextRetryTime -eq $NULL")


def test_enum_values_are_canonicalized() -> None:
    f = parse("Status -eq retry", QUEUE_FIELDS)
    assert f.expression == Comparison(QUEUE_FIELDS["Status"], "-eq", "retry")
    assert f.matches({"Status": "RETRY"})


def test_quotes_and_doubled_quotes() -> None:
    assert message("Subject -eq 'It''s the Q4 report'")
    assert message('Subject -eq "It\'s the Q4 report"')
    assert message('Subject -eq "say ""hi"""', Subject='say "hi"')
    assert message("Subject -eq ''", Subject="")
    assert message("Subject -eq 'a (b) {c} -and d'", Subject="A (B) {C} -AND D")


def test_bare_words() -> None:
    assert queue("Identity -eq HUB1\\contoso.example")
    assert message("SourceIP -eq 10.0.0.5")
    assert message("InternetMessageId -eq <abc@contoso.com>")
    assert queue("MessageCount -gt -5")


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("*", True),
        ("*@contoso.com", True),
        ("kim.akers@*", True),
        ("kim*@*.com", True),
        ("???.akers@contoso.com", True),
        ("??.akers@contoso.com", False),
        ("contoso.com", False),  # -like matches the whole value, not a substring
        ("*contoso", False),
        ("k*s*s*m", True),
        ("*@contoso.co?", True),
        ("**@**", True),
    ],
)
def test_like_wildcards(pattern: str, expected: bool) -> None:
    assert message(f"FromAddress -like '{pattern}'") is expected
    assert message(f"FromAddress -notlike '{pattern}'") is not expected


def test_contains_is_a_case_insensitive_substring() -> None:
    assert queue("LastError -contains 'unable TO connect'")
    assert not queue("LastError -contains refused")
    assert message("Subject -contains Q4")


def test_ordering_on_strings_and_enums_compares_text() -> None:
    assert queue("Site -gt redmond", Site="Seattle")
    assert queue("Site -le REDMOND")
    assert queue("Status -gt Ready")  # "retry" > "ready"
    assert not queue("Status -lt ready")


def test_ne_on_text_and_none() -> None:
    assert queue("Status -ne Active")
    assert not queue("Status -ne retry")
    assert message("LastError -ne 'timeout'")  # None is not 'timeout'


# --- Lists ------------------------------------------------------------------------------------------


def test_list_fields_match_when_any_element_does() -> None:
    assert message("Recipients -like '*@fabrikam.example'")
    assert message("Recipients -eq LEE@contoso.com")
    assert message("RecipientDomains -eq fabrikam.example")
    assert message("RecipientDomains -contains FABRIKAM")
    assert not message("RecipientDomains -eq tailspin.example")
    assert message("RecipientDomains -gt d")  # "fabrikam.example" > "d"


def test_negated_operators_on_lists_mean_no_element() -> None:
    assert not message("RecipientDomains -ne fabrikam.example")
    assert message("RecipientDomains -ne tailspin.example")
    assert not message("Recipients -notlike '*@fabrikam.example'")
    assert message("Recipients -notlike '*@tailspin.example'")


def test_empty_and_missing_lists_are_null() -> None:
    empty: list[list[str] | None] = [[], None]
    for value in empty:
        assert message("Recipients -eq $null", Recipients=value)
        assert not message("Recipients -ne $null", Recipients=value)
        assert not message("Recipients -like '*'", Recipients=value)
    assert message("Recipients -ne $null")
    assert message("RecipientDomains -eq contoso.com", RecipientDomains=("contoso.com",))


# --- Datetimes and None -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-26T10:00:00",
        "'2026-11-26 10:00'",
        '"2026-11-26T10:00:00Z"',
        "2026-11-26T11:00:00+01:00",
        "2026-11-26T05:00:00-05:00",
    ],
)
def test_datetime_forms(value: str) -> None:
    assert message(f"DateReceived -eq {value}")
    assert not message(f"DateReceived -ne {value}")


def test_datetime_ordering() -> None:
    assert message("DateReceived -gt 2026-11-26")  # a date alone is its midnight, UTC
    assert message("DateReceived -lt 2026-11-27")
    assert not message("DateReceived -eq 2026-11-26")
    assert message("DateReceived -ge '2026-11-26 10:00' -and DateReceived -le '2026-11-26 10:00'")
    assert message("DateReceived -gt 2026-11-26T11:00:00+02:00")  # 09:00 UTC
    assert not message("DateReceived -gt 2026-11-26T11:00:00Z")


def test_record_datetimes_may_be_objects_or_naive() -> None:
    moment = datetime(2026, 11, 26, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    assert message("DateReceived -eq 2026-11-26T10:00:00", DateReceived=moment)
    assert message("DateReceived -eq 2026-11-26T10:00:00", DateReceived=datetime(2026, 11, 26, 10))
    assert message("DateReceived -eq 2026-11-26T10:00:00", DateReceived="2026-11-26 10:00")


@pytest.mark.parametrize("operator", ["-gt", "-ge", "-lt", "-le"])
def test_none_never_matches_ordering(operator: str) -> None:
    assert not queue(f"NextRetryTime {operator} 2000-01-01")
    assert not queue(f"MessageCount {operator} 0", MessageCount=None)
    assert not queue(f"Site {operator} m", Site=None)


def test_none_equals_only_null() -> None:
    assert queue("NextRetryTime -eq $null")
    assert not queue("NextRetryTime -ne $null")
    assert not queue("NextRetryTime -eq 2026-11-26")
    assert queue("NextRetryTime -ne 2026-11-26")
    assert not queue("LastRetryTime -eq $null")
    assert queue("LastRetryTime -ne $null")
    assert not message("LastError -like '*'")
    assert not message("LastError -contains ''")
    assert message("Subject -eq $null", Subject=None)


def test_missing_keys_are_none() -> None:
    f = parse("Site -eq $null -and MessageCount -eq $null", QUEUE_FIELDS)
    assert f.matches({})


# --- Sizes and durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("2MB", 2 * 1024**2),
        ("2mb", 2 * 1024**2),
        ("10KB", 10240),
        ("1.5KB", 1536),
        ("'10 KB'", 10240),
        ("7", 7),
    ],
)
def test_sizes(value: str, size: int) -> None:
    f = parse(f"Size -eq {value}", MESSAGE_FIELDS)
    assert isinstance(f.expression, Comparison)
    assert f.expression.operand == size
    assert f.matches({"Size": size})


def test_size_comparisons() -> None:
    assert message("Size -ge 2MB -and Size -lt 3MB")
    assert not message("Size -gt 2MB")
    assert queue("MessageCount -lt 1KB")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30), ("5m", 300), ("4h", 14400), ("2d", 172800), ("90", 90), ("1.5h", 5400)],
)
def test_durations(value: str, seconds: int) -> None:
    f = parse(f"Age -eq {value}", MESSAGE_FIELDS)
    assert isinstance(f.expression, Comparison)
    assert f.expression.operand == seconds
    assert f.matches({"Age": seconds})


def test_age_comparisons() -> None:
    assert message("Age -gt 4h")
    assert not message("Age -gt 1d")
    assert message("Age -gt 4h -and Age -lt 1d -and RetryCount -ge 3")


# --- Other fields and the API -----------------------------------------------------------------------


def test_bool_fields() -> None:
    fields = {"Held": Field("Held", "bool")}
    assert parse("Held -eq $true", fields).matches({"Held": True})
    assert parse("Held -ne $TRUE", fields).matches({"Held": False})
    assert parse("Held -eq false", fields).matches({"Held": False})
    assert not parse("Held -eq $false", fields).matches({"Held": None})


def test_field_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="kind"):
        Field("X", "float")
    with pytest.raises(ValueError, match="enum"):
        Field("X", "enum")
    with pytest.raises(ValueError, match="duration"):
        Field("X", "str", duration=True)


def test_field_tables() -> None:
    assert list(QUEUE_FIELDS) == [
        "Identity", "DeliveryType", "Status", "MessageCount", "NextHopDomain", "LastError",
        "LastRetryTime", "NextRetryTime", "Site", "NextHopConnector",
    ]  # fmt: skip
    assert QUEUE_FIELDS["DeliveryType"].values[-1] == "Unreachable"
    assert MESSAGE_FIELDS["Status"].values == (
        "Active", "Ready", "Retry", "Suspended", "PendingSuspend", "PendingRemove",
    )  # fmt: skip
    assert MESSAGE_FIELDS["Recipients"].kind == "list"
    assert MESSAGE_FIELDS["Age"] == Field("Age", "int", duration=True)
    assert len(MESSAGE_FIELDS) == 16


def test_wrong_record_types_raise() -> None:
    with pytest.raises(ValueError, match="MessageCount"):
        queue("MessageCount -gt 1", MessageCount="many")
    with pytest.raises(ValueError, match="LastRetryTime"):
        queue("LastRetryTime -gt 2026-01-01", LastRetryTime="yesterday")
    with pytest.raises(ValueError, match="Recipients"):
        message("Recipients -eq x", Recipients=5)


def test_filter_error_is_a_mailyard_error_and_pickles() -> None:
    problem = error("MessageCount -gt many")
    assert isinstance(problem, MailyardError)
    assert (problem.position, problem.length, problem.text) == (17, 4, "MessageCount -gt many")
    assert problem.reason.startswith("'many' is not a number")
    copy = pickle.loads(pickle.dumps(problem))
    assert str(copy) == str(problem)


# --- Errors: the caret points at the bad part ----------------------------------------------------------


def test_unknown_operator() -> None:
    assert lines("Status -eq Retry -and MessageCount -gtx 5") == [
        "unknown operator '-gtx': use -eq, -ne, -gt, -ge, -lt, -le, -like, -notlike, -contains",
        "  Status -eq Retry -and MessageCount -gtx 5",
        "                                     ^^^^",
    ]


def test_unknown_property_with_suggestion() -> None:
    assert lines("Status -eq Retry -or MesageCount -gt 5") == [
        "unknown property 'MesageCount' (did you mean MessageCount?)",
        "  Status -eq Retry -or MesageCount -gt 5",
        "                       ^^^^^^^^^^^",
    ]


def test_unknown_property_without_suggestion() -> None:
    assert lines("Colour -eq red", MESSAGE_FIELDS) == [
        "unknown property 'Colour': the properties are Identity, Queue, FromAddress, Status, Size, "
        "Subject, DateReceived, ExpirationTime, RetryCount, LastError, InternetMessageId, SourceIP, "
        "Recipients, RecipientDomains, Age, Site",
        "  Colour -eq red",
        "  ^^^^^^",
    ]


def test_property_of_the_other_table() -> None:
    assert lines("Subject -eq x")[0] == "unknown property 'Subject': the properties are " + ", ".join(
        QUEUE_FIELDS
    )


def test_enum_typo_suggests() -> None:
    assert lines("Status -eq Retyr") == [
        "unknown Status value 'Retyr' (did you mean Retry?)",
        "  Status -eq Retyr",
        "             ^^^^^",
    ]


def test_enum_typo_quoted_points_at_the_string() -> None:
    assert lines("DeliveryType -ne 'DnsConector'") == [
        "unknown DeliveryType value 'DnsConector' (did you mean DnsConnectorDelivery?)",
        "  DeliveryType -ne 'DnsConector'",
        "                   ^^^^^^^^^^^^^",
    ]


def test_enum_value_without_suggestion() -> None:
    assert lines("(Status -eq Frozen)") == [
        "unknown Status value 'Frozen': use Active, Ready, Retry, Suspended",
        "  (Status -eq Frozen)",
        "              ^^^^^^",
    ]


def test_enum_values_differ_between_tables() -> None:
    assert message("Status -ne PendingRemove")
    assert lines("Status -eq PendingRemove")[2] == "             ^^^^^^^^^^^^^"


def test_enum_pattern_that_fits_no_value() -> None:
    assert lines("Status -like 'Retyr*'") == [
        "'Retyr*' fits no Status value: Status is one of Active, Ready, Retry, Suspended",
        "  Status -like 'Retyr*'",
        "               ^^^^^^^^",
    ]
    assert queue("Status -like 'Re*'")
    assert queue("Status -contains TR")


def test_int_rejects_words() -> None:
    assert lines("MessageCount -gt many") == [
        "'many' is not a number: MessageCount takes a number such as 100, or a size such as 10KB or 2MB",
        "  MessageCount -gt many",
        "                   ^^^^",
    ]


def test_size_field_rejects_durations() -> None:
    assert lines("Size -gt 4h", MESSAGE_FIELDS) == [
        "'4h' is not a number: Size takes a number such as 100, or a size such as 10KB or 2MB",
        "  Size -gt 4h",
        "           ^^",
    ]


def test_age_rejects_sizes() -> None:
    assert lines("Age -lt 2MB", MESSAGE_FIELDS) == [
        "'2MB' is not a duration: Age takes a duration such as 30s, 5m, 4h or 2d",
        "  Age -lt 2MB",
        "          ^^^",
    ]


def test_bad_date() -> None:
    assert lines("LastRetryTime -gt 'last tuesday'") == [
        "'last tuesday' is not a date: LastRetryTime takes a date such as 2026-11-26, "
        "'2026-11-26 10:00' or 2026-11-26T10:00:00Z",
        "  LastRetryTime -gt 'last tuesday'",
        "                    ^^^^^^^^^^^^^^",
    ]


def test_operator_that_does_not_fit_the_kind() -> None:
    assert lines("MessageCount -like '1*'") == [
        "-like does not apply to MessageCount, which takes a number such as 100, or a size such as "
        "10KB or 2MB: use -eq, -ne, -gt, -ge, -lt, -le",
        "  MessageCount -like '1*'",
        "               ^^^^^",
    ]


def test_missing_operator() -> None:
    assert lines("Status -eq Retry -and Site") == [
        "missing operator after Site: use -eq, -ne, -gt, -ge, -lt, -le, -like, -notlike, -contains",
        "  Status -eq Retry -and Site",
        "                        ^^^^",
    ]


def test_symbol_instead_of_operator() -> None:
    assert lines("MessageCount > 100") == [
        "expected an operator after MessageCount, found '>' (write -gt): use -eq, -ne, -gt, -ge, -lt, -le",
        "  MessageCount > 100",
        "               ^",
    ]


def test_value_instead_of_operator() -> None:
    assert lines("Status Retry") == [
        "expected an operator after Status, found 'Retry': "
        "use -eq, -ne, -gt, -ge, -lt, -le, -like, -notlike, -contains",
        "  Status Retry",
        "         ^^^^^",
    ]


def test_missing_value_at_the_end() -> None:
    assert lines("Status -eq Retry -and MessageCount -gt") == [
        "missing value after -gt: MessageCount takes a number such as 100, or a size such as 10KB or 2MB",
        "  Status -eq Retry -and MessageCount -gt",
        "                                     ^^^",
    ]


def test_missing_value_before_a_keyword_or_parenthesis() -> None:
    assert lines("Site -EQ -and Status -eq Retry") == [
        "missing value after -eq: Site takes text",
        "  Site -EQ -and Status -eq Retry",
        "       ^^^",
    ]
    assert lines("(Site -like)")[2] == "        ^^^^^"
    assert lines("{Site -ne}")[2] == "        ^^^"


def test_dash_word_as_value_must_be_quoted() -> None:
    assert lines("Site -eq -redmond") == [
        "'-redmond' reads as an operator: quote it to use it as a value",
        "  Site -eq -redmond",
        "           ^^^^^^^^",
    ]
    assert queue("Site -eq '-redmond'", Site="-Redmond")


def test_unclosed_single_quote() -> None:
    assert lines("Status -eq Retry -and LastError -like '*timeout*") == [
        "unclosed quote: this ' has no closing '",
        "  Status -eq Retry -and LastError -like '*timeout*",
        "                                        ^",
    ]


def test_unclosed_double_quote_after_an_escaped_one() -> None:
    assert lines('Subject -eq "say ""hi""', MESSAGE_FIELDS) == [
        'unclosed quote: this " has no closing "',
        '  Subject -eq "say ""hi""',
        "              ^",
    ]


def test_unclosed_parenthesis() -> None:
    assert lines("Status -eq Retry -and (MessageCount -gt 5 -or Site -eq x") == [
        "unclosed parenthesis: this ( has no matching )",
        "  Status -eq Retry -and (MessageCount -gt 5 -or Site -eq x",
        "                        ^",
    ]
    assert lines("((Status -eq Retry)")[2] == "  ^"


def test_unmatched_closing_parenthesis() -> None:
    assert lines("Status -eq Retry) -and Site -eq x") == [
        "unmatched ): there is no ( before it",
        "  Status -eq Retry) -and Site -eq x",
        "                  ^",
    ]


def test_empty_parentheses() -> None:
    assert lines("Status -eq Retry -and ( )") == [
        "empty parentheses: write a comparison inside them",
        "  Status -eq Retry -and ( )",
        "                        ^^^",
    ]


def test_unclosed_brace() -> None:
    assert lines("{Status -eq Retry") == [
        "unclosed brace: this { has no matching }",
        "  {Status -eq Retry",
        "  ^",
    ]


def test_unmatched_brace() -> None:
    assert lines("Status -eq Retry}") == [
        "unmatched }: there is no { before it",
        "  Status -eq Retry}",
        "                  ^",
    ]


def test_brace_inside_the_filter() -> None:
    assert lines("Status -eq Retry -and {Site -eq x}") == [
        "unexpected {: braces can only wrap the whole filter",
        "  Status -eq Retry -and {Site -eq x}",
        "                        ^",
    ]


def test_text_after_the_closing_brace() -> None:
    assert lines("{Status -eq Retry} -and Site -eq x") == [
        "unexpected '-and' after the closing }: the braces must wrap the whole filter",
        "  {Status -eq Retry} -and Site -eq x",
        "                     ^^^^",
    ]


def test_trailing_word_after_a_value() -> None:
    assert lines("Subject -eq quarterly report", MESSAGE_FIELDS) == [
        "unexpected 'report' after the value quarterly: quote a value that contains spaces, "
        "or join comparisons with -and or -or",
        "  Subject -eq quarterly report",
        "                        ^^^^^^",
    ]


def test_trailing_and_without_dash() -> None:
    assert lines("Status -eq Retry and Site -eq x") == [
        "unexpected 'and' (write -and)",
        "  Status -eq Retry and Site -eq x",
        "                   ^^^",
    ]


def test_trailing_group() -> None:
    assert lines("(Status -eq Retry) (Site -eq x)") == [
        "unexpected '(': expected -and or -or",
        "  (Status -eq Retry) (Site -eq x)",
        "                     ^",
    ]


def test_missing_comparison_after_and() -> None:
    assert lines("Status -eq Retry -and ") == [
        "missing comparison after -and",
        "  Status -eq Retry -and ",
        "                   ^^^^",
    ]
    assert lines("-NOT")[:1] == ["missing comparison after -not"]


def test_keyword_where_a_comparison_belongs() -> None:
    assert lines("Status -eq Retry -and -or Site -eq x") == [
        "expected a comparison such as MessageCount -gt 100, found '-or'",
        "  Status -eq Retry -and -or Site -eq x",
        "                        ^^^",
    ]
    assert lines("-eq 5", MESSAGE_FIELDS)[0] == "expected a comparison such as Size -gt 100, found '-eq'"


def test_bang_instead_of_not() -> None:
    assert lines("!(Status -eq Retry)") == [
        "expected a property name, found '!' (write -not)",
        "  !(Status -eq Retry)",
        "  ^",
    ]


def test_quoted_property_name() -> None:
    assert lines("'Status' -eq Retry") == [
        "expected a property name, found the quoted string 'Status': do not quote names",
        "  'Status' -eq Retry",
        "  ^^^^^^^^",
    ]


def test_null_with_an_ordering_operator() -> None:
    assert lines("MessageCount -ge $null") == [
        "$null can only be compared with -eq or -ne, not -ge",
        "  MessageCount -ge $null",
        "                   ^^^^^",
    ]


def test_true_on_a_non_bool_field() -> None:
    assert lines("Status -eq $true") == [
        "Status takes one of Active, Ready, Retry, Suspended, not $true",
        "  Status -eq $true",
        "             ^^^^^",
    ]


def test_unknown_variable() -> None:
    assert lines("Site -eq $site") == [
        "unknown variable '$site': use $true, $false or $null",
        "  Site -eq $site",
        "           ^^^^^",
    ]


def test_value_in_parentheses() -> None:
    assert lines("Site -eq (x)") == [
        "expected a value after -eq, found '(': Site takes text",
        "  Site -eq (x)",
        "           ^",
    ]


@pytest.mark.parametrize(("text", "carets"), [("", "^"), ("   ", "^^^"), ("{}", "^^"), ("{  }", "^^^^")])
def test_empty_filter(text: str, carets: str) -> None:
    assert lines(text) == [
        "empty filter: write a comparison such as MessageCount -gt 100",
        "  " + text,
        "  " + carets,
    ]


def test_brace_alone_is_unclosed() -> None:
    assert lines("{ ") == ["unclosed brace: this { has no matching }", "  { ", "  ^"]


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert queue("(" * 50 + "Status -eq Retry" + ")" * 50)
    assert queue("-not " * 50 + "Status -eq Retry")
    assert not queue("-not " * 51 + "Status -eq Retry")
    assert error("(" * 5000 + "Status -eq Retry" + ")" * 5000).reason == "the filter nests too deeply"


def test_carets_line_up_under_tabs_and_newlines() -> None:
    text = "Status -eq Retry\n\t-and\tSite -eq x y"
    assert lines(text) == [
        "unexpected 'y' after the value x: quote a value that contains spaces, or join comparisons with -and or -or",
        "  Status -eq Retry \t-and\tSite -eq x y",
        "                   \t    \t           ^",
    ]


def test_the_status_and_delivery_type_values_a_filter_knows_are_the_hubs() -> None:
    # Taken from the hub's enums (mailyard.hub.queue_rows); the shared core spells none of them.
    from mailyard import filters
    from mailyard.hub.queues import QueueStatus
    from mailyard.hub.records import DeliveryType, ItemStatus, PendingAction

    assert set(QUEUE_FIELDS["Status"].values) == {s.value for s in QueueStatus}
    assert set(MESSAGE_FIELDS["Status"].values) == {s.value for s in ItemStatus} | {
        p.value for p in PendingAction if p.value}
    assert set(QUEUE_FIELDS["DeliveryType"].values) == {d.value for d in DeliveryType}
    for status in QueueStatus:
        assert parse(f"Status -eq {status.value}", QUEUE_FIELDS).matches({"Status": status.value})
    source = Path(filters.__file__).read_text(encoding="utf-8")
    assert not any(f'"{v}"' in source for v in (*QUEUE_FIELDS["Status"].values, *MESSAGE_FIELDS["Status"].values,
                                                *QUEUE_FIELDS["DeliveryType"].values))
