"""Plan the commands that move the kernel from one Ruleset to another (pure).

A :class:`Plan` runs in three steps, each all-or-nothing where the tool allows:

1. ``ipset_restore`` (``ipset restore -exist``): create new sets, add/del
   members (delta) or fill a temporary set and ``swap`` it in (full sync);
2. ``iptables_restore[family]`` (``iptables-restore --noflush``, one atomic
   transaction per family): declare (= create or flush) only the changed
   chains, write their rules, then ``-F``/``-X`` the chains no longer needed;
3. ``ipset_destroy``: destroy the sets no longer referenced.

A failure in step 2 leaves the family's previous chains in force; sets touched
in step 1 only ever gain new sets or the new membership of existing ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from netfence.dataplane.kernel import KernelState, hook_fix
from netfence.dataplane.names import temp_set_name
from netfence.dataplane.ruleset import FAMILIES, Family, IpSet, Ruleset, element_key, is_owned_chain


@dataclass(frozen=True, slots=True)
class Plan:
    full: bool
    ipset_restore: str = ""
    iptables_restore: dict[Family, str] = field(default_factory=dict)
    ipset_destroy: str = ""
    changed_chains: dict[Family, tuple[str, ...]] = field(default_factory=dict)
    removed_chains: dict[Family, tuple[str, ...]] = field(default_factory=dict)
    changed_sets: tuple[str, ...] = ()
    removed_sets: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.ipset_restore or self.iptables_restore or self.ipset_destroy)


def _restore_text(lines: list[str]) -> str:
    return "*filter\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


def _chain_lines(
    chains: dict[str, tuple[str, ...]], write: list[str], remove: list[str], extra: tuple[str, ...] = ()
) -> list[str]:
    lines = [f":{c} - [0:0]" for c in write]
    for chain in write:
        lines += [f"-A {chain} {rule}" for rule in chains[chain]]
    lines += [f"-F {c}" for c in remove] + [f"-X {c}" for c in remove]
    return lines + list(extra)


def _fill(s: IpSet, name: str) -> list[str]:
    return [s.create_line(name)] + [f"add {name} {m}" for m in sorted(s.members)]


def _rebuild(s: IpSet, leftover_temp: bool) -> list[str]:
    """Atomically replace the contents of an existing set via a swap."""
    tmp = temp_set_name(s.name)
    return [f"destroy {tmp}"] * leftover_temp + _fill(s, tmp) + [f"swap {tmp} {s.name}", f"destroy {tmp}"]


def _member_delta(old: IpSet, new: IpSet) -> list[str]:
    dels = [f"del {new.name} {element_key(m)}" for m in sorted(old.members - new.members)]
    adds = [f"add {new.name} {m}" for m in sorted(new.members - old.members)]
    return dels + adds


def _text(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def plan(
    applied: Ruleset | None,
    desired: Ruleset,
    *,
    kernel: KernelState | None = None,
    spell: Callable[[tuple[str, ...]], tuple[str, ...]] | None = None,
) -> Plan:
    """The commands turning ``applied`` into ``desired``.

    ``applied`` None means a full sync against ``kernel`` (the state read from
    the kernel; None = nothing of ours exists): the desired chains are written
    in one transaction per family, existing sets are refilled through a swap,
    and whatever of ours the kernel holds beyond ``desired`` is removed. The
    hook in FORWARD is (re)placed at the top within the same transaction.
    When ``kernel`` was read with set contents (``kernel.sets``), chains and
    sets the kernel already holds exactly as desired are left alone (chains
    compared after ``spell``, the kernel's spelling of rendered rules); read
    with names only, every chain is rewritten and every set refilled.
    """
    if applied is None:
        return _full_plan(desired, kernel or KernelState(), spell or (lambda rules: rules))
    ipset_lines: list[str] = []
    changed_sets: list[str] = []
    for name, new in desired.sets.items():
        old = applied.sets.get(name)
        if old is new:  # kept by the incremental renderer: unchanged
            continue
        if old is None:
            lines = _fill(new, name)
        elif old.header() != new.header():
            lines = _rebuild(new, leftover_temp=False)
        else:
            lines = _member_delta(old, new)
        if lines:
            ipset_lines += lines
            changed_sets.append(name)
    removed_sets = sorted(n for n in applied.sets if n not in desired.sets)

    restores: dict[Family, str] = {}
    changed: dict[Family, tuple[str, ...]] = {}
    removed: dict[Family, tuple[str, ...]] = {}
    for fam in FAMILIES:
        old_chains, new_chains = applied.family_chains(fam), desired.family_chains(fam)
        if old_chains is new_chains:
            continue
        write = [c for c, rules in new_chains.items() if (prev := old_chains.get(c)) is not rules and prev != rules]
        drop = sorted(c for c in old_chains if c not in new_chains)
        if write or drop:
            restores[fam] = _restore_text(_chain_lines(new_chains, write, drop))
            changed[fam], removed[fam] = tuple(write), tuple(drop)
    return Plan(
        full=False,
        ipset_restore=_text(ipset_lines),
        iptables_restore=restores,
        ipset_destroy=_text([f"destroy {n}" for n in removed_sets]),
        changed_chains=changed,
        removed_chains=removed,
        changed_sets=tuple(changed_sets),
        removed_sets=tuple(removed_sets),
    )


def _full_plan(desired: Ruleset, kernel: KernelState, spell: Callable[[tuple[str, ...]], tuple[str, ...]]) -> Plan:
    keep = kernel.sets  # read with contents: leave alone what already is as desired
    ipset_lines: list[str] = []
    changed_sets: list[str] = []
    handled_temps: set[str] = set()
    for name, s in desired.sets.items():
        if keep is not None and keep.get(name) == s:
            continue
        changed_sets.append(name)
        if name in kernel.set_names:
            tmp = temp_set_name(name)
            ipset_lines += _rebuild(s, leftover_temp=tmp in kernel.set_names)
            handled_temps.add(tmp)
        else:
            ipset_lines += _fill(s, name)
    stale_sets = sorted(kernel.set_names - set(desired.sets) - handled_temps)

    restores: dict[Family, str] = {}
    changed: dict[Family, tuple[str, ...]] = {}
    removed: dict[Family, tuple[str, ...]] = {}
    for fam in desired.families:
        chains = desired.family_chains(fam)
        table = kernel.table(fam)
        stale = sorted(c for c in table.chains if c not in chains and is_owned_chain(c))
        write = list(chains) if keep is None else [c for c, r in chains.items() if table.chains.get(c) != spell(r)]
        fix = tuple(hook_fix(table.hooks))
        if write or stale or fix:
            restores[fam] = _restore_text(_chain_lines(chains, write, stale, fix))
        changed[fam], removed[fam] = tuple(write), tuple(stale)
    return Plan(
        full=True,
        ipset_restore=_text(ipset_lines),
        iptables_restore=restores,
        ipset_destroy=_text([f"destroy {n}" for n in stale_sets]),
        changed_chains=changed,
        removed_chains=removed,
        changed_sets=tuple(changed_sets),
        removed_sets=tuple(stale_sets),
    )


def uninstall_plan(kernel: KernelState) -> Plan:
    """Remove our hook, chains and sets (and nothing else)."""
    restores: dict[Family, str] = {}
    removed: dict[Family, tuple[str, ...]] = {}
    for fam, table in sorted(kernel.tables.items()):
        if not table.chains and not table.hooks:
            continue
        unhook = [f"-D FORWARD {p}" for p in sorted(table.hooks, reverse=True)]
        restores[fam] = _restore_text(unhook + _chain_lines({}, [], list(table.chains)))
        removed[fam] = tuple(table.chains)
    sets = sorted(kernel.set_names)
    return Plan(
        full=True,
        iptables_restore=restores,
        ipset_destroy=_text([f"destroy {n}" for n in sets]),
        removed_chains=removed,
        removed_sets=tuple(sets),
    )
