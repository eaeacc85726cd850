"""The redaction rule: records are shown by location and reason, never by content."""

from dpray.privacy.redact import describe, fingerprint, redact_text, safe_exception_message
from dpray.rundir import RunDir


def test_redact_text_shows_length_only():
    secret = "Alice Smith, account 12345678"
    shown = redact_text(secret)
    assert secret not in shown and "Alice" not in shown
    assert shown == f"<redacted str len={len(secret)}>"
    assert redact_text(b"abc") == "<redacted bytes len=3>"
    assert redact_text(3) == "<redacted int>"


def test_describe_is_location_and_reason():
    assert describe("a.jsonl", 7, "too_long") == "a.jsonl:7: too_long"
    assert describe("b.parquet", 3, "empty_text", unit="row") == "b.parquet:row 3: empty_text"


def test_fingerprint_keyed_and_stable():
    assert fingerprint("x", b"k") == fingerprint("x", b"k")
    assert fingerprint("x", b"k") != fingerprint("x", b"other")
    assert len(fingerprint("x", b"k")) == 16


def test_safe_exception_message_drops_message():
    try:
        raise ValueError("private: Bob's diagnosis")
    except ValueError as exc:
        assert safe_exception_message(exc) == "ValueError"


def test_rundir_zones(tmp_path):
    run_dir = RunDir(tmp_path / "r")
    assert run_dir.is_private(run_dir.private("ingest") / "x")
    assert not run_dir.is_private(run_dir.public("sample") / "x")
    (run_dir.private("a") / "f").write_text("p")
    (run_dir.public("b") / "g").write_text("q")
    assert [p.name for p in run_dir.public_files()] == ["g"]
