"""The policy engine's view of a world's config: the JSON ``--system-info`` reads.

A running world's daemons do not read it: they ask the world's admin socket
(``internal.GetSystemInfo``), which answers with the same facts from the live
domains, DispVMs included.
"""

from __future__ import annotations

from typing import Any

from ._policy import ADMIN_VM
from ._spec import WorldConfig


def system_info_json(config: WorldConfig) -> dict[str, Any]:
    """dom0 as the AdminVM and every declared VM; DispVMs are added at run time."""
    domains: dict[str, Any] = {ADMIN_VM: {"type": "AdminVM"}}
    for vm in config.vms:
        domains[vm.name] = {
            "type": vm.type,
            "tags": list(vm.tags),
            "default_dispvm": vm.default_dispvm,
            "template_for_dispvms": vm.template_for_dispvms,
        }
    return {"domains": domains}
