"""The hls section of the configuration: defaults, environment overrides, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load
from agent.errors import ConfigError


def test_defaults_and_environment(tmp_path: Path) -> None:
    config = load(environ={"THERELAY_STATE_DIR": str(tmp_path)})
    assert (config.hls.enabled, config.hls.part_duration, config.hls.segment_duration,
            config.hls.segments, config.hls.session_timeout) == (True, 0.5, 2.0, 6, 30.0)
    config = load(environ={"THERELAY_STATE_DIR": str(tmp_path), "THERELAY_HLS_ENABLED": "false",
                           "THERELAY_HLS_PART_DURATION": "1"})
    assert not config.hls.enabled and config.hls.part_duration == 1.0


@pytest.mark.parametrize(("yaml", "message"), [
    ("part_duration: 0", r"hls\.part_duration: must be 0\.1 to 5 seconds"),
    ("segment_duration: 1\n  part_duration: 0.75",
     r"hls\.segment_duration: must be at least twice hls\.part_duration"),
    ("segments: 1", r"hls\.segments: must be 2 to 60"),
    ("max_memory_mb: 1", r"hls\.max_memory_mb: must be 4 to 4096"),
    ("session_timeout: 1", r"hls\.session_timeout: must be 5 to 3600 seconds"),
    ("max_blocking: 0", r"hls\.max_blocking: must be 1 to 100000"),
    ("part_duraton: 1", r"hls\.part_duraton: unknown key \(did you mean 'part_duration'\?\)"),
    ("enabled: maybe", r"hls\.enabled: expected true or false"),
])
def test_bad_values_are_named(tmp_path: Path, yaml: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"hls:\n  {yaml}\n")
    with pytest.raises(ConfigError, match=message):
        load(path, environ={"THERELAY_STATE_DIR": str(tmp_path)})
