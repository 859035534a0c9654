"""Dataplane bookkeeping against a scripted runner (no kernel); the real thing is in integration."""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import pytest
from dataplane_samples import ingress_basic

from netfence.dataplane.apply import ApplyError, Dataplane
from netfence.dataplane.render import Features, render
from netfence.dataplane.ruleset import Ruleset
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
    in_ns = SubprocessRunner("x").argv(["iptables", "-S"])
    assert in_ns[-2:] == ["iptables", "-S"]
    assert in_ns[:-2] in (["ip", "netns", "exec", "x"], [shutil.which("nsenter"), "--net=/run/netns/x", "--"])
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


class EchoKernel:
    """A kernel that holds exactly what was last restored (read back through iptables-save / ipset save)."""

    def __init__(self, save: str, ipset_save: str) -> None:
        self.save, self.ipset_save = save, ipset_save

    def run(self, argv: Sequence[str], input: str | None = None) -> Result:
        if argv[0] == "iptables-save":
            return Result(0, self.save, "")
        if argv[:2] == ["ipset", "save"]:
            return Result(0, self.ipset_save, "")
        return Result(0, "", "")


def _kernel_text(desired: Ruleset) -> tuple[str, str]:
    chains = desired.family_chains("v4")
    save = "*filter\n:FORWARD ACCEPT [0:0]\n" + "".join(f":{c} - [0:0]\n" for c in chains)
    save += "-A FORWARD -j NETFENCE-FORWARD\n" + "".join(f"-A {c} {r}\n" for c, rules in chains.items() for r in rules)
    sets = "".join(s.create_line() + "\n" + "".join(f"add {s.name} {m}\n" for m in sorted(s.members))
                   for s in desired.sets.values())
    return save + "COMMIT\n", sets


def test_a_restart_on_an_intact_kernel_reads_once_and_writes_nothing() -> None:
    desired = render(ingress_basic(), features=Features(ipv6=False))
    rec = RecordingRunner(EchoKernel(*_kernel_text(desired)))
    dp = Dataplane(rec, ipv6=False)
    result = dp.apply(desired)
    assert result.full
    assert rec.commands() == [("iptables-save", "-t", "filter"), ("ipset", "save")]  # no write, no read-back
    assert dp.check_drift() is False  # the snapshot is the kernel as read
    rec.clear()
    legacy = Dataplane(rec, ipv6=False, rewrite_all=True)  # the benchmarks' "before" path rewrites everything
    legacy.apply(desired)
    assert [c[0] for c in rec.commands()] == ["iptables-save", "ipset", "ipset", "iptables-restore",
                                             "iptables-save", "ipset"]


def test_ensure_hooks_reads_the_kernel_ahead_for_the_first_full_sync_only() -> None:
    desired = render(ingress_basic(), features=Features(ipv6=False))
    rec = RecordingRunner(EchoKernel(*_kernel_text(desired)))
    dp = Dataplane(rec, ipv6=False, prefetch=True)
    dp.ensure_hooks()
    assert dp.apply(desired).full
    reads = [c for c in rec.commands() if c[0] == "iptables-save" or c[:2] == ("ipset", "save")]
    assert reads == [("iptables-save", "-t", "filter"), ("ipset", "save")]  # read once, ahead, then used
    rec.clear()
    dp.forget_applied()
    assert dp.apply(desired).full
    assert rec.commands() == [("iptables-save", "-t", "filter"), ("ipset", "save")]  # read afresh
