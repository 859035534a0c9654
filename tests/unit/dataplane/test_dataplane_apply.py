"""Dataplane bookkeeping against a scripted runner (no kernel); the real thing is in integration."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from dataplane_samples import ingress_basic

from netfence.dataplane.apply import ApplyError, Dataplane
from netfence.dataplane.render import Features, render
from netfence.dataplane.runner import RecordingRunner, Result, SubprocessRunner


class ScriptedKernel:
    """Answers reads with empty state and accepts every write, except those it is told to fail."""

    def __init__(self) -> None:
        self.fail_next: str | None = None

    def run(self, argv: Sequence[str], input: str | None = None) -> Result:
        if self.fail_next == argv[0]:
            self.fail_next = None
            return Result(2, "", f"{argv[0]}: boom")
        return Result(0, "", "")


def test_subprocess_runner_prefixes_netns_and_reports_missing_tools() -> None:
    assert SubprocessRunner("x").argv(["iptables", "-S"]) == ["ip", "netns", "exec", "x", "iptables", "-S"]
    assert SubprocessRunner().argv(["iptables", "-S"]) == ["iptables", "-S"]
    result = SubprocessRunner().run(["/nonexistent/tool"])
    assert result.returncode == 127 and not result.ok


def test_first_apply_is_a_full_sync_then_deltas_then_full_after_failure() -> None:
    kernel = ScriptedKernel()
    rec = RecordingRunner(kernel)
    dp = Dataplane(rec, ipv6=False)
    desired = render(ingress_basic())
    assert dp.apply(desired).full
    assert [c[0] for c in rec.commands()] == [
        "iptables-save",
        "ipset",
        "ipset",
        "iptables-restore",  # read, fill sets, one restore
        "iptables-save",
        "ipset",  # read-back snapshot
    ]
    rec.clear()
    assert not dp.apply(desired).full and rec.commands() == []

    kernel.fail_next = "iptables-restore"
    with pytest.raises(ApplyError, match="boom") as err:
        dp.apply(render(ingress_basic(), features=Features(drop_invalid=False)))
    assert err.value.stderr == "iptables-restore: boom" and dp.applied is None
    rec.clear()
    assert dp.apply(desired).full


def test_repair_before_apply_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        Dataplane(ScriptedKernel()).repair()
    assert Dataplane(ScriptedKernel()).check_drift() is False
