"""Config-string grammar: valid specs parse to typed values, malformed ones name the bad part."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagellm_backend import ErrorCode, InvalidArgumentError, InvalidSpecError, UnknownOptionError
from sagellm_backend.errors import BackendError
from sagellm_backend.registry import BackendRegistry, BackendSpec, Candidate, parse_spec

FUZZ = {"spec strings": 0, "option sets": 0}


@pytest.fixture(scope="module", autouse=True)
def _report_fuzz_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.ensure_newline()
            counts = ", ".join(f"{n} {what}" for what, n in FUZZ.items())
            reporter.write_line(f"config-string fuzzing: {counts} generated")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mock", (Candidate("mock"),)),
        ("  Mock ", (Candidate("mock"),)),
        ("cuda:0", (Candidate("cuda", 0),)),
        ("cuda:12", (Candidate("cuda", 12),)),
        ("ascend_cann", (Candidate("ascend_cann"),)),
        (
            "mock?max_memory_mb=1024&num_layers=4",
            (Candidate("mock", None, (("max_memory_mb", "1024"), ("num_layers", "4"))),),
        ),
        ("cuda:1?device_ids=0+1", (Candidate("cuda", 1, (("device_ids", "0+1"),)),)),
        ("cuda, cpu", (Candidate("cuda"), Candidate("cpu"))),
        (" mock , cpu ", (Candidate("mock"), Candidate("cpu"))),
        (
            "\tmock?max_memory_mb=8 ,\ncpu:0 ",
            (Candidate("mock", None, (("max_memory_mb", "8"),)), Candidate("cpu", 0)),
        ),
        (
            "cuda:0,cuda:1,mock?supported_dtypes=fp16+fp32",
            (
                Candidate("cuda", 0),
                Candidate("cuda", 1),
                Candidate("mock", None, (("supported_dtypes", "fp16+fp32"),)),
            ),
        ),
        ("auto", (Candidate("auto"),)),
        ("x?path=/tmp/a.b-c_d", (Candidate("x", None, (("path", "/tmp/a.b-c_d"),)),)),
    ],
)
def test_valid_specs_parse_to_candidates(text: str, expected: tuple[Candidate, ...]) -> None:
    spec = parse_spec(text)
    assert spec == BackendSpec(expected)
    assert parse_spec(str(spec)) == spec, "the canonical form parses back to the same spec"


def test_auto_is_recognised_and_option_text_is_kept_verbatim() -> None:
    assert parse_spec("AUTO").is_auto
    assert not parse_spec("cuda,cpu").is_auto
    candidate = parse_spec("mock?a=1&b=x+y").candidates[0]
    assert candidate.option_dict == {"a": "1", "b": "x+y"}
    assert str(candidate) == "mock?a=1&b=x+y"


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("cuda:", "''"),
        ("cuda:x", "'x'"),
        ("cuda:-1", "'-1'"),
        ("cuda:1:2", "'1:2'"),
        ("cu da", "'cu da'"),
        ("9cuda", "'9cuda'"),
        ("cuda,,cpu", "entry 2"),
        ("cuda,", "entry 2"),
        (",cuda", "entry 1"),
        ("mock?", "no options"),
        ("mock?x", "'x' of 'mock' has no value"),
        ("mock?x=", "'x' of 'mock' has no value"),
        ("mock?=1", "'' in '=1'"),
        ("mock?a=1&&b=2", "'' in ''"),
        ("mock?a=1&a=2", "given twice"),
        ("mock?a=1;import_os", "'1;import_os'"),
        ("mock?a=1;import os", "has a space inside"),
        ("mock?a=$(rm -rf /)", "'mock?a=$(rm -rf /)' has a space inside"),
        ("mock?a=$(id)", "'$(id)'"),
        ("mock :0", "'mock :0' has a space inside"),
        ("mock: 0", "'mock: 0' has a space inside"),
        ("mock ?max_memory_mb=8", "'mock ?max_memory_mb=8' has a space inside"),
        ("mock? max_memory_mb=8", "'mock? max_memory_mb=8' has a space inside"),
        ("mock?max_memory_mb =8", "has a space inside"),
        ("mock?max_memory_mb=8 &num_layers=2", "has a space inside"),
        ("cpu, mock :0", "'mock :0' has a space inside"),
        ("mo\tck", "has a space inside"),
        ("moc\u212a", "'moc\u212a' is not a backend kind"),
        ("m\u00f6ck", "is not a backend kind"),
        ("mock?Max=1", "'Max'"),
        ("auto,mock", "must stand alone"),
        ("auto:0", "no device index"),
        ("auto?x=1", "no device index or options"),
        ("os.system:1", "'os.system'"),
        ("sagellm_backend.mock:create_mock_backend", "'sagellm_backend.mock'"),
    ],
)
def test_malformed_specs_name_the_bad_part(text: str, bad_part: str) -> None:
    with pytest.raises(InvalidSpecError) as info:
        parse_spec(text)
    error = info.value
    assert error.code is ErrorCode.INVALID_SPEC
    assert isinstance(error, ValueError)
    assert bad_part in error.message
    assert error.hint is not None and "kind:N" in error.hint


@pytest.mark.parametrize("value", [None, 3, b"mock", ["mock"]])
def test_non_string_specs_are_refused(value: object) -> None:
    with pytest.raises(InvalidSpecError, match="must be a string"):
        parse_spec(value)


def test_overlong_specs_are_refused_before_parsing() -> None:
    with pytest.raises(InvalidSpecError, match="limit"):
        parse_spec("mock," * 2000)


_ALPHABET = st.sampled_from(list("mockcudapu_019:?&=,+-./ $;()'\"\\\n\tAZ"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(_ALPHABET, max_size=40))
def test_fuzzed_strings_parse_or_raise_invalid_spec(text: str) -> None:
    FUZZ["spec strings"] += 1
    error: InvalidSpecError | None = None
    try:
        spec = parse_spec(text)
    except InvalidSpecError as exc:
        error = exc
    if error is not None:
        assert error.message.startswith(("malformed backend spec", "backend spec is empty"))
        assert error.code is ErrorCode.INVALID_SPEC
        return
    assert parse_spec(str(spec)) == spec
    for candidate in spec.candidates:
        assert candidate.kind.isidentifier() and candidate.kind == candidate.kind.lower()


_OPTION_NAMES = st.sampled_from(
    ["max_memory_mb", "num_layers", "has_stream", "supported_dtypes", "device_ids", "bogus"]
)
_OPTION_VALUES = st.text(st.sampled_from(list("0123456789-+.truefalsfp16bx")), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_OPTION_NAMES, _OPTION_VALUES, max_size=4))
def test_fuzzed_mock_options_create_a_backend_or_raise_a_typed_error(
    options: dict[str, str],
) -> None:
    """Whatever the option text, the outcome is a provider or an error from errors.py."""
    FUZZ["option sets"] += 1
    text = "mock"
    if options:
        text += "?" + "&".join(f"{k}={v}" for k, v in options.items())
    error: BackendError | None = None
    try:
        BackendRegistry().get_backend(text).close()
    except BackendError as exc:
        error = exc
    if error is None:
        assert "bogus" not in options
        return
    assert isinstance(error, InvalidArgumentError), error
    if "bogus" in options and isinstance(error, UnknownOptionError):
        assert "bogus" in error.message
