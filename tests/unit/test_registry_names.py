"""Names, aliases, stages and versions are refused before anything is written (issue 20, 2)."""

from __future__ import annotations

import os

import pytest

from heimdall.errors import InputError
from heimdall.registry import names
from heimdall.registry.names import (
    MAX_ALIAS_CHARS,
    MAX_NAME_BYTES,
    check_alias,
    check_name,
    check_registration,
    check_version,
)

# What a non-UTF-8 argv byte becomes in a Python str (surrogateescape).
NOT_UTF8 = os.fsdecode(b"heimdall-\xff")


@pytest.mark.parametrize(
    "name",
    [
        "heimdall-localization-onnx",
        "a",
        "Model_2.onnx v3",
        "ortungsmodell-größe",
        "x" * MAX_NAME_BYTES,
    ],
)
def test_names_mlflow_s3_and_file_systems_accept_pass(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x" * 600, r"600 bytes long.* at most 128 bytes"),
        ("é" * 65, r"130 bytes long.* at most 128 bytes"),
        (NOT_UTF8, "not valid UTF-8"),
        ("", "empty"),
        ("a/b", r"'/'"),
        ("a\\b", r"'\\\\'"),
        ("a:b", "':'"),
        ("a@b", "'@'"),
        ("it's", '"\'"'),
        ("a#b", "'#'"),
        ("a?b", r"'\?'"),
        ("a%b", "'%'"),
        ("a\nb", r"'\\n'"),
        ("a\x00b", r"'\\x00'"),
        ("a\u200bb", r"'\\u200b'"),
        ("..", "not start with a letter or digit"),
        (".hidden", "not start with a letter or digit"),
        ("-x", "not start with a letter or digit"),
        (" x", "not start with a letter or digit"),
        ("x ", "not end with"),
        ("heimdall-lock.x", "heimdall-lock."),
    ],
)
def test_names_any_of_them_would_refuse_fail_in_one_line(name: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as refused:
        check_name(name)
    text = str(refused.value)
    assert "\n" not in text
    assert "letters, digits" in text  # says what is accepted


@pytest.mark.parametrize(
    ("alias", "message"),
    [
        ("latest", "reserved by MLflow"),
        ("LATEST", "reserved by MLflow"),
        ("Latest", "reserved by MLflow"),
        ("v1", "reserved by MLflow"),
        ("V1", "reserved by MLflow"),
        ("v0042", "reserved by MLflow"),
        ("", "empty"),
        ("a b", "other characters"),
        ("prod@1", "other characters"),
        ("größe", "other characters"),
        (NOT_UTF8, "not valid UTF-8"),
        ("a" * (MAX_ALIAS_CHARS + 1), f"1 to {MAX_ALIAS_CHARS} ASCII"),
        ("Production", "only in case"),
        ("PRODUCTION", "only in case"),
        ("Staging", "only in case"),
    ],
)
def test_aliases_mlflow_refuses_or_that_shadow_ours_fail_in_one_line(
    alias: str, message: str
) -> None:
    with pytest.raises(InputError, match=message) as refused:
        check_alias(alias)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("alias", ["staging", "production", "canary", "staging-int8", "v1x", "A_b"])
def test_good_aliases_pass(alias: str) -> None:
    check_alias(alias)


@pytest.mark.parametrize("alias", ["production", "Production", "PRODUCTION"])
def test_publish_never_moves_production_in_any_case(alias: str) -> None:
    with pytest.raises(InputError, match="production"):
        check_registration("heimdall-x", alias)


def test_publish_refuses_the_production_stage_which_follows_the_production_alias() -> None:
    with pytest.raises(InputError, match="promote"):
        check_registration("heimdall-x", "staging", "production")


def test_publish_checks_the_name_the_alias_and_the_stage() -> None:
    check_registration("heimdall-x", "staging", "staging")
    with pytest.raises(InputError, match="stage"):
        check_registration("heimdall-x", "staging", "Prod")
    with pytest.raises(InputError, match="bytes"):
        check_registration("x" * 600, "staging")
    with pytest.raises(InputError, match="reserved"):
        check_registration("heimdall-x", "V1")


@pytest.mark.parametrize("version", ["1", "7", "123456789"])
def test_version_numbers_pass(version: str) -> None:
    assert check_version(version) == version


def test_an_int_version_is_its_number() -> None:
    assert check_version(3) == "3"


@pytest.mark.parametrize(
    ("version", "message"),
    [
        ("latest", r"models show NAME"),
        ("Latest", r"models show NAME"),
        ("0", "version number"),
        ("-1", "version number"),
        ("01", "version number"),
        ("1.0", "version number"),
        ("²", "version number"),
        ("1" * 10, "version number"),
        ("", "version number"),
        ("v3", "version number"),
    ],
)
def test_anything_but_a_version_number_fails_in_one_line(version: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as refused:
        check_version(version)
    assert "\n" not in str(refused.value)


def test_a_models_uri_with_a_bad_name_or_alias_is_refused_before_mlflow() -> None:
    with pytest.raises(InputError, match="bytes"):
        names.parse_models_uri(f"models:/{'x' * 300}@staging")
    with pytest.raises(InputError, match="reserved"):
        names.parse_models_uri("models:/heimdall-x@V1")
