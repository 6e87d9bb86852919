"""doctor's checks of the audit quota and of the open-files limit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from agent.config import AuditSection, Config, HttpSection, SessionsSection
from agent.doctor import limits
from agent.doctor.model import Status
from agent.state.db import connect, db_path

REPO = Path(__file__).resolve().parents[2]


def _config(tmp: Path, **audit: int) -> Config:
    return replace(Config(), state_dir=tmp, audit=AuditSection(**audit))


def test_the_audit_size_warns_before_the_quota_and_fails_at_it(tmp_path: Path) -> None:
    assert limits.audit_size_sync(_config(tmp_path)).status is Status.SKIP
    conn = connect(db_path(tmp_path))
    conn.execute("CREATE TABLE filler (x BLOB)")
    conn.execute("INSERT INTO filler VALUES (zeroblob(14 * 1024 * 1024))")
    conn.commit()
    conn.close()
    assert limits.audit_size_sync(_config(tmp_path, max_size_mb=100)).status is Status.OK
    warned = limits.audit_size_sync(_config(tmp_path, max_size_mb=16))
    assert warned.status is Status.WARN and "max_size_mb" in (warned.fix or "")
    conn = connect(db_path(tmp_path))
    conn.execute("INSERT INTO filler VALUES (zeroblob(4 * 1024 * 1024))")
    conn.commit()
    conn.close()
    failed = limits.audit_size_sync(_config(tmp_path, max_size_mb=16))
    assert failed.status is Status.FAIL and "only counted" in failed.finding


def test_the_unit_raises_the_open_files_limit_enough() -> None:
    unit = (REPO / "systemd" / "therelay-agent.service").read_text()
    limit = limits.unit_limit(unit)
    assert limit is not None and limit >= limits.needed_files(Config())
    assert limits.unit_limit("[Service]\nLimitNOFILE=1024:4096\n") == 4096
    assert limits.unit_limit("[Service]\nExecStart=x\n") is None


def test_open_files_warns_when_the_caps_need_more(tmp_path: Path, monkeypatch) -> None:
    unit = tmp_path / "therelay-agent.service"
    unit.write_text("[Service]\nExecStart=/x\n")
    monkeypatch.setattr(limits, "UNIT_FILES", (unit,))
    found = limits.open_files_sync(Config())
    assert found.status is Status.WARN and "1024" in found.finding
    unit.write_text("[Service]\nLimitNOFILE=65536\n")
    assert limits.open_files_sync(Config()).status is Status.OK
    big = replace(Config(), http=HttpSection(max_connections=60000),
                  sessions=SessionsSection(max_total=10000, max_per_ip=32))
    assert limits.open_files_sync(big).status is Status.WARN
