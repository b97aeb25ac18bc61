'''A local world's config: which VMs exist, their services, and the policy.

``qrexec-trio world CONFIG.toml`` starts a whole world from one TOML file.
:func:`load_world_config` reads and checks all of it before anything starts;
the first problem raises :class:`WorldConfigError`, whose text is
``FILE:LINE: what is wrong`` (FILE is the config, or the policy file at fault).

The format (every table and key is optional unless marked required; unknown
keys are errors, so a typo never silently means a default)::

    [world]
    user = "alice"              # the VMs' default user; default: whoever runs the world
    group = "qrexec"            # an existing group whose members may use the world (run
                                # commands in its VMs as its VMs' users): its directory
                                # becomes 0750 and that group's. Default: the world is
                                # private to whoever runs it (0700)

    [dom0.services]             # services of dom0 itself, in the forms shown below
    "my.Echo" = "exec cat"

    [vm.work]                   # required: at least one VM. The name: a letter, then up
                                # to 30 of A-Z a-z 0-9 _ . -; not dom0, not dispN
    domid = 10                  # 1..32767, unique; default: the free ones from 10, in
                                # file order
    type = "AppVM"              # AppVM (default), StandaloneVM or TemplateVM
    tags = ["trusted"]          # for @tag: in the policy
    default_dispvm = "dvm"      # what @dispvm means for calls from work: a VM of this
                                # world with template_for_dispvms = true
    template_for_dispvms = false
    autostart = true            # start with the world (default); else on first call
    default_user = "alice"      # default: [world] user

    [vm.work.services]          # file name = handler; "SERVICE" or "SERVICE+ARGUMENT"
    "demo.Echo" = "exec cat"                    # a shell script body (run by /bin/sh)
    "demo.Date" = { command = "date -u" }       # the same, spelt out
    "qubes.Filecopy" = { file = "services/filecopy.sh" }
                                # a script file, relative to the config file; it must
                                # exist, be executable and start with "#!"

    [policy]
    rules = """                 # policy.d format: SERVICE ARG SOURCE TARGET ACTION [k=v]
    demo.Echo * work vault allow
    """
    files = ["policy/extra.policy"]     # more policy.d files, relative to the config
    agent = "work"              # where 'ask' rules are asked and notifications go:
                                # dom0 or a VM that starts with the world. The world
                                # installs policy.Ask and policy.Notify there (unless the
                                # config defines them), running `qrexec-trio policy-agent`,
                                # which asks on the world's terminal; default: dom0, with
                                # only the services [dom0.services] gives it

An inline body that starts with ``#!`` is a whole script (any interpreter);
otherwise it is wrapped as ``#!/bin/sh\\n<body>\\n``. The policy is checked with
the project's parser, errors reported at the config's line for inline rules and
at the policy file's line for ``files``; rules may name only dom0 and the VMs
of the world (``@dispvm:VM`` only DispVM templates), and ``!include`` is not
allowed. Inline rules are evaluated first, then the files in the order listed;
no matching rule denies.

:func:`system_info_json` gives the config's domains as the policy engine reads
them (the ``--system-info`` JSON); a running world serves the same facts, live
and with its DispVMs, on its admin socket (``internal.GetSystemInfo``).
'''

from ._config import load_world_config as load_world_config
from ._errors import WorldConfigError as WorldConfigError
from ._spec import PolicyOrigin as PolicyOrigin
from ._spec import ServiceSpec as ServiceSpec
from ._spec import VMSpec as VMSpec
from ._spec import WorldConfig as WorldConfig
from ._system_info import system_info_json as system_info_json
