"""Which supervisor owns the slots' processes here: systemd when it runs the machine and hal0's units are
installed, the embedded one otherwise; settings can force either. Always with a reason a person can read.
"""

from __future__ import annotations

from pathlib import Path

from hal0.settings import Settings
from hal0.supervisors.base import Supervisor
from hal0.supervisors.embedded import EmbeddedSupervisor

#: The slots' template unit (`hal0-slot@<name>.service`); hal0.supervisors.systemd, which drives it, is imported
#: only where systemd is chosen.
TEMPLATE_UNIT = "hal0-slot@.service"

#: Where systemd looks for system units, highest priority first (systemd.unit(5)).
UNIT_SEARCH_PATH = (
    "etc/systemd/system", "run/systemd/system", "usr/local/lib/systemd/system", "usr/lib/systemd/system",
    "lib/systemd/system",
)


def systemd_is_pid1(root: Path = Path("/")) -> tuple[bool, str]:
    """(is systemd the init system, how we know): the test sd_booted() uses, then /proc/1/comm."""
    if (root / "run/systemd/system").is_dir():
        return True, "/run/systemd/system exists"
    try:
        comm = (root / "proc/1/comm").read_text().strip()
    except OSError:
        comm = ""
    if comm == "systemd":
        return True, "/proc/1/comm is systemd"
    return False, f"no /run/systemd/system and PID 1 is {comm or 'unknown'!r}"


def installed_template(root: Path = Path("/")) -> Path | None:
    for unit_dir in UNIT_SEARCH_PATH:
        path = root / unit_dir / TEMPLATE_UNIT
        if path.is_file():
            return path
    return None


def choose_supervisor(settings: Settings, *, root: Path = Path("/"),
                      unit_dir: Path | None = None) -> tuple[Supervisor, str]:
    """The supervisor for these settings on this machine, and why it was chosen."""

    def embedded() -> Supervisor:
        return EmbeddedSupervisor(settings.slots_state_dir, settings.log_dir)

    def systemd() -> Supervisor:
        from hal0.supervisors.systemd import UNIT_DIR, SystemdSupervisor

        return SystemdSupervisor(unit_dir or UNIT_DIR, stop_timeout_s=settings.stop_timeout_s)

    if settings.supervisor == "embedded":
        return embedded(), "supervisor = embedded in settings"
    pid1, how = systemd_is_pid1(root)
    template = installed_template(root)
    if settings.supervisor == "systemd":
        caveats = []
        if not pid1:
            caveats.append(f"but systemd does not seem to be running ({how})")
        if template is None:
            caveats.append(f"but {TEMPLATE_UNIT} is not installed (run `hal0 setup --systemd`)")
        return systemd(), " ".join(["supervisor = systemd in settings", *caveats])
    if not pid1:
        return embedded(), f"auto: systemd is not the init system ({how})"
    if template is None:
        return embedded(), (f"auto: systemd is the init system ({how}) but {TEMPLATE_UNIT} is not installed "
                            "(`hal0 setup --systemd` installs it)")
    return systemd(), f"auto: systemd is the init system ({how}) and {template} is installed"
