"""faasci.usage with real processes: the kernel's accounting (wait4) of a command's process
tree, plain and in the stage sandbox, summed over a block's commands."""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from faasci import shell, usage
from faasci.sandbox import SYSTEM_PATH, Sandbox, stage_path
from faasci.settings import Settings, configure

# Burns 0.3 s of CPU time (by its own clock, whatever else the machine does) in a grandchild
# of the command's shell.
BURN = (
    "python3 -c 'import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass'"
)
PLAIN_ENV = {"PATH": SYSTEM_PATH}  # the system's python3, as in the sandbox
# Holds 80 MiB resident for 0.3 s.
HOLD = (
    "python3 -c 'import time\nb = bytearray(80 * 2**20)\n"
    'b[::4096] = b"x" * len(b[::4096])\ntime.sleep(0.3)\''
)


def run_plain(tmp_path: Path, *commands: str) -> tuple[shell.Outcome, usage.Usage]:
    with (tmp_path / "log").open("wb") as log, usage.metered() as meter:
        outcome = shell.run_commands(list(commands), shell.plain(tmp_path), PLAIN_ENV, 60, log)
    return outcome, meter.total


def test_a_commands_cpu_counts_its_descendants(tmp_path):
    """The CPU a command's grandchild burned is the command's (rusage of the reaped tree)."""
    outcome, used = run_plain(tmp_path, BURN)
    assert outcome.passed
    assert used.commands == 1
    assert used.cpu_s >= 0.3
    assert used.wall_s >= used.cpu_s * 0.9  # one process at a time: wall covers its CPU
    assert used.peak_rss_bytes > 1 * 2**20


def test_commands_of_a_block_sum_their_cpu_and_keep_the_largest_peak(tmp_path):
    """Two commands: CPU and wall time add up, the peak memory is the larger one's."""
    _, burn = run_plain(tmp_path, BURN)
    _, hold = run_plain(tmp_path, HOLD)
    _, both = run_plain(tmp_path, BURN, HOLD)
    assert hold.peak_rss_bytes >= 80 * 2**20 > burn.peak_rss_bytes
    assert both.commands == 2
    assert both.cpu_s >= 0.3 + hold.cpu_s * 0.5
    assert both.peak_rss_bytes >= 80 * 2**20


def test_a_large_launcher_does_not_pass_its_memory_off_as_the_commands(tmp_path):
    """The command's first process is forked from the (large) function process, whose
    resident set Linux counts in that process's ru_maxrss: the peak reported is the
    command's own, seen in its tree's high-water marks."""
    ballast = bytearray(300 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # resident: the launcher holds 300 MiB
    _, burn = run_plain(tmp_path, BURN)
    _, hold = run_plain(tmp_path, HOLD)
    assert len(ballast) and 0 < burn.peak_rss_bytes < 80 * 2**20
    assert 80 * 2**20 <= hold.peak_rss_bytes < 300 * 2**20


def test_the_tree_high_water_mark_finds_a_grandchild_whatever_its_name(tmp_path):
    """tree_hwm: the largest VmHWM among a process and its descendants, here a grandchild
    holding 80 MiB under a name with spaces and parentheses (as /proc/<pid>/stat shows
    it); 0 for a process that is gone."""
    odd = tmp_path / "a) b (c"
    odd.symlink_to(Path(sys.executable).resolve())
    hold = (
        "import time\nb = bytearray(80 * 2**20)\nb[::4096] = b'x' * len(b[::4096])\n"
        "open('held', 'w').close()\ntime.sleep(30)"
    )
    parent = subprocess.Popen(["sh", "-c", f'"{odd}" -c "{hold}"; true'], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "held").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert usage.hwm(parent.pid) < 20 * 2**20 <= 80 * 2**20 <= usage.tree_hwm(parent.pid)
    finally:
        parent.kill()
        parent.wait()
    assert usage.tree_hwm(parent.pid) == 0


def test_a_command_stopped_at_its_deadline_is_still_counted(tmp_path):
    """A command killed at its timeout is reaped by the stage, so its CPU is recorded."""
    spin = "python3 -c 'while True: pass'"
    with (tmp_path / "log").open("wb") as log, usage.metered() as meter:
        outcome = shell.run_commands([spin], shell.plain(tmp_path), PLAIN_ENV, 1, log)
    assert outcome.timed_out
    assert meter.total.commands == 1 and meter.total.cpu_s > 0.1
    assert meter.total.cpu_s <= meter.total.wall_s * 1.05  # one spinning process: not twice


def test_a_sandboxed_command_stopped_at_its_deadline_is_counted_once(box):
    """In the sandbox, a command that ends on the stop's TERM is reaped inside (by the
    namespace's pid 1): its CPU counts once, not again as the sample taken at the stop."""
    box.prepare()
    env = {"PATH": stage_path(box.service_dir), "HOME": str(box.workspace / "home")}
    spin = "python3 -c 'while True: pass'"
    with (box.attempt / "stage.log").open("wb") as log, usage.metered() as meter:
        outcome = shell.run_commands([spin], box.launch, env, 1, log)
    assert outcome.timed_out
    assert 0.1 < meter.total.cpu_s <= meter.total.wall_s * 1.05


def test_nested_blocks_count_in_the_outer_one_too(tmp_path):
    """A metered block inside another: the outer sees the inner's commands as well."""
    with usage.metered() as outer:
        _, inner = run_plain(tmp_path, BURN)
        _, _ = run_plain(tmp_path, "true")
    assert inner.commands == 1 and outer.total.commands == 2
    assert outer.total.cpu_s >= inner.cpu_s


def test_usage_adds_cpu_and_wall_and_keeps_the_peak():
    """Usage.add: sums CPU, wall and commands; the peak is the maximum."""
    a = usage.Usage(cpu_s=1.5, peak_rss_bytes=100, wall_s=2.0, commands=1)
    b = usage.Usage(cpu_s=0.5, peak_rss_bytes=300, wall_s=1.0, commands=2)
    assert a.add(b) == usage.Usage(cpu_s=2.0, peak_rss_bytes=300, wall_s=3.0, commands=3)


@pytest.fixture
def box(tmp_path):
    """A stage sandbox for one attempt (platform folders outside /tmp)."""
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="faasci-secrets-") as folder:
        configure(Settings(secrets_dir=Path(folder), workdir=tmp_path / "work",
                           cache_dir=tmp_path / "cache", workspace=tmp_path / "ws"))  # fmt: skip
        attempt = tmp_path / "work" / "run-usage-1"
        (attempt / "src").mkdir(parents=True)
        yield Sandbox(attempt)
        configure(None)


def test_the_sandboxed_command_is_accounted_through_its_namespaces(box):
    """In the sandbox (unshare, a pid namespace, an inner user namespace) the command's CPU
    and memory still reach the stage: the namespaces' processes are all reaped within."""
    box.prepare()
    env = {"PATH": stage_path(box.service_dir), "HOME": str(box.workspace / "home")}
    with (box.attempt / "stage.log").open("wb") as log, usage.metered() as meter:
        outcome = shell.run_commands([BURN, HOLD], box.launch, env, 60, log)
    assert outcome.passed, (box.attempt / "stage.log").read_text()
    assert meter.total.commands == 2
    assert meter.total.cpu_s >= 0.3
    assert meter.total.peak_rss_bytes >= 80 * 2**20


def test_a_cgroup_v2_is_read_as_cpu_seconds_and_peak_bytes(tmp_path):
    """cgroup v2: cpu.stat's usage_usec as seconds, memory.peak as bytes; gone: None."""
    folder = tmp_path / "unified" / "libpod-1"
    folder.mkdir(parents=True)
    (folder / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (folder / "memory.peak").write_text("104857600\n")
    where = {"cpu": str(folder), "memory": str(folder), "version": "2"}
    assert usage.read_cgroup(where) == (2.5, 104857600)
    assert usage.read_cgroup({**where, "cpu": str(tmp_path / "gone")}) is None


def test_a_cgroup_v1_is_read_from_its_cpuacct_and_memory_hierarchies(tmp_path):
    """cgroup v1: cpuacct.usage (ns) and memory.max_usage_in_bytes, each in its hierarchy."""
    (tmp_path / "cpuacct" / "c1").mkdir(parents=True)
    (tmp_path / "memory" / "c1").mkdir(parents=True)
    (tmp_path / "cpuacct" / "c1" / "cpuacct.usage").write_text("1500000000\n")
    (tmp_path / "memory" / "c1" / "memory.max_usage_in_bytes").write_text("52428800\n")
    where = {"cpu": str(tmp_path / "cpuacct" / "c1"), "memory": str(tmp_path / "memory" / "c1"),
             "version": "1"}  # fmt: skip
    assert usage.read_cgroup(where) == (1.5, 52428800)


def test_this_process_has_a_readable_cgroup():
    """cgroup_dir finds where the kernel accounts a live process, on this machine's layout
    (v1 or v2), and read_cgroup reads CPU seconds and a peak from there."""
    import os

    where = usage.cgroup_dir(os.getpid())
    assert where is not None and where["version"] in ("1", "2")
    cpu, peak = usage.read_cgroup(where)
    assert cpu > 0 and peak > 0
    assert usage.cgroup_dir(2**22 + 1) is None  # no such process
