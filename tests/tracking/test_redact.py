"""Passwords in URIs are masked in every form glm-ft writes or logs: as typed, and as Hydra escapes a sweep's
overrides (`http\\://user\\:password@host`)."""

from __future__ import annotations

import logging

import pytest

from glm_ft.tracking.redact import MASK, redact, redact_log_records, secrets_in


@pytest.mark.parametrize("text, expected", [
    ("http://u:pw@h:5000", f"http://u:{MASK}@h:5000"),
    ("tracking.tracking_uri=http\\://u\\:pw@127.0.0.1\\:5000",
     f"tracking.tracking_uri=http\\://u\\:{MASK}@127.0.0.1\\:5000"),
    ("uri: 'https://:pw@h/x'", f"uri: 'https://:{MASK}@h/x'"),
    ("http://h:5000/x and sqlite:////tmp/a.db", "http://h:5000/x and sqlite:////tmp/a.db"),  # nothing to mask
])
def test_a_password_is_masked_as_typed_and_as_hydra_escapes_it(text, expected):
    assert redact(text) == expected
    assert secrets_in(expected) == []
    assert secrets_in(text) == (["pw"] if "pw" in text else [])


def test_log_records_are_masked_whatever_handlers_are_set_up_later(caplog):
    factory = logging.getLogRecordFactory()
    try:
        redact_log_records()
        redact_log_records()  # once is enough: not wrapped twice
        assert logging.getLogRecordFactory() is not factory and logging.getLogRecordFactory().redacts
        with caplog.at_level(logging.INFO):
            logging.getLogger("hydra.launcher").info("\t#%d : %s", 0, "tracking.tracking_uri=http\\://u\\:pw@h")
        assert caplog.messages == [f"\t#0 : tracking.tracking_uri=http\\://u\\:{MASK}@h"]
        # a malformed call still returns to its caller (logging reports it when a handler formats the record)
        quiet = logging.getLogger("glm_ft.test.malformed")
        quiet.propagate, quiet.handlers = False, [logging.NullHandler()]
        quiet.warning("%d", "not a number")
    finally:
        logging.setLogRecordFactory(factory)
