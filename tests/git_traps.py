"""A repository armed with traps: its .git/config, a config file it includes and its hooks
name commands that each touch a marker file when git runs them (fsmonitor, hooks, filter
drivers with .gitattributes, diff.external, textconv, pager, editor, sshCommand, askPass,
credential helper, gpg signing, upload-pack's pack-objects hook...). Whatever touches no
marker ran none of them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

TRAP_CONFIG = """\
[core]
\tfsmonitor = {bin}/trap-fsmonitor
\tpager = {bin}/trap-pager
\teditor = {bin}/trap-editor
\tsshCommand = {bin}/trap-ssh
\taskPass = {bin}/trap-askpass
\talternateRefsCommand = {bin}/trap-alternate-refs
\tuntrackedCache = true
[include]
\tpath = {git_dir}/more.config
[filter "trap"]
\tclean = {bin}/trap-filter clean
\tsmudge = {bin}/trap-filter smudge
[filter "trapproc"]
\tprocess = {bin}/trap-filter-process
[diff]
\texternal = {bin}/trap-diff-external
[diff "trap"]
\ttextconv = {bin}/trap-textconv
[credential]
\thelper = {bin}/trap-credential
[commit]
\tgpgSign = true
[gpg]
\tprogram = {bin}/trap-gpg
[uploadpack]
\tpackObjectsHook = {bin}/trap-pack-objects-hook
[protocol]
\tallow = always
"""
MORE_CONFIG = "[core]\n\thooksPath = {hooks}\n"
HOOKS = ("pre-commit", "commit-msg", "post-commit", "post-checkout", "post-merge",
         "post-index-change", "reference-transaction", "pre-auto-gc", "post-rewrite",
         "fsmonitor-watchman", "pre-push", "push-to-checkout")  # fmt: skip
# Files of an armed repository: .txt files go through the clean/smudge driver, .dat files
# through the process driver.
TRAP_FILES = {
    ".gitattributes": "*.txt filter=trap diff=trap\n*.dat filter=trapproc\n",
    ".gitignore": "*.log\n",
    "a.txt": "committed text\n",
    "data.dat": "d = 1\n",
    "app.py": "v = 1\n",
}


def arm(repo: Path, folder: Path) -> Path:
    """Arm `repo` (after the test's own git work on it, which the traps would break),
    the trap scripts in `folder`; returns the folder where markers appear (empty now)."""
    markers, bin_dir, hooks = folder / "markers", folder / "trap-bin", folder / "hooks"
    for where in (markers, bin_dir, hooks):
        where.mkdir(parents=True, exist_ok=True)
    scripts = {
        f"trap-{name}": f'#!/bin/sh\ntouch "{markers}/{name}"\n'
        for name in re.findall(r"\{bin\}/trap-([a-z-]+)", TRAP_CONFIG)
    }
    scripts |= {
        "trap-fsmonitor": f'#!/bin/sh\ntouch "{markers}/fsmonitor"\nexit 1\n',
        # A working filter (cat), so git's own use of it succeeds and shows.
        "trap-filter": f'#!/bin/sh\ntouch "{markers}/filter-$1"\nexec cat\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    for hook in HOOKS:
        (hooks / hook).write_text(f'#!/bin/sh\ntouch "{markers}/hook-{hook}"\n')
        (hooks / hook).chmod(0o755)
    git_dir = repo / ".git"
    if git_dir.is_file():  # a worktree: its repository's own folder
        git_dir = Path(subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=repo,
            check=True, capture_output=True, text=True).stdout.strip())  # fmt: skip
    with (git_dir / "config").open("a") as config:
        config.write(TRAP_CONFIG.format(bin=bin_dir, git_dir=git_dir))
    (git_dir / "more.config").write_text(MORE_CONFIG.format(hooks=hooks))
    for hook in HOOKS:  # the default hooks folder too, in case the include were skipped
        shutil.copy2(hooks / hook, git_dir / "hooks" / hook)
    (git_dir / "info").mkdir(exist_ok=True)
    (git_dir / "info" / "exclude").write_text("private-notes.md\n")
    return markers
