"""The command lines that clusters/ schedules, and a parser that reads them back out of the files.

The manifests and the README under clusters/ run two commands: a study (a KubeRay RayJob) and the nightly
leaderboard (a RayCronJob, a Kubernetes CronJob, a crontab line, a `ray job submit` line). Tests elsewhere run
exactly these commands under `ray job submit` with /mnt/mergescale mapped to a temporary directory, and
tests/test_clusters.py checks that every file still holds exactly these commands: together they tie the
files to commands that are known to run.

A plain helper module (not collected by pytest): it imports only the standard library and PyYAML.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import yaml

#: the shared filesystem every node and pod mounts
MOUNT = "/mnt/mergescale"
#: the RayJob's entrypoint (clusters/kuberay/rayjob-study.yaml)
STUDY = "mergescale study run /mnt/mergescale/specs/study.yaml --out /mnt/mergescale/results/study"
#: the nightly leaderboard, in each of its four scheduled forms
LEADERBOARD = (
    "mergescale leaderboard run /mnt/mergescale/leaderboard"
    " && mergescale leaderboard publish /mnt/mergescale/leaderboard --out /mnt/mergescale/site"
)

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"

#: README markers: an HTML comment `<!-- entrypoint: NAME -->` right before a fenced code block
README_MARKERS = ("crontab", "ray job submit")
_OPERATORS = {"&&", "||", ";", "|", "&", ";;"}
_SHELLS = {"sh", "bash", "/bin/sh", "/bin/bash", "/usr/bin/sh", "/usr/bin/bash"}


def entrypoints(root: Path | str = ROOT) -> dict[str, str]:
    """Each scheduled command, as parsed from its file under `root`/clusters (keys: the file and, for the
    README, the marked block)."""
    clusters = Path(root) / "clusters"
    rayjob = _load(clusters / "kuberay/rayjob-study.yaml")
    raycronjob = _load(clusters / "kuberay/raycronjob-leaderboard.yaml")
    cronjob = _load(clusters / "kuberay/cronjob-leaderboard.yaml")
    readme = (clusters / "README.md").read_text()
    return {
        "clusters/kuberay/rayjob-study.yaml": rayjob["spec"]["entrypoint"],
        "clusters/kuberay/raycronjob-leaderboard.yaml": raycronjob["spec"]["jobTemplate"]["entrypoint"],
        "clusters/kuberay/cronjob-leaderboard.yaml": cronjob_command(cronjob),
        "clusters/README.md crontab": crontab_command(readme_block(readme, "crontab")),
        "clusters/README.md ray job submit": job_submit_command(readme_block(readme, "ray job submit")),
    }


def mapped(command: str, root: Path | str) -> str:
    """`command` with the shared mount /mnt/mergescale replaced by the directory `root` (a test's temporary
    directory standing in for the shared filesystem; it must need no shell quoting)."""
    root = os.fspath(root).rstrip("/") or "/"
    if shlex.quote(root) != root:
        raise ValueError(f"{root!r} needs shell quoting; use a directory without spaces or shell characters")
    return command.replace(MOUNT, root)


# ----------------------------------------------------------------------------------------------- parsers


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def after_double_dash(words: list[str]) -> str:
    """The command the head runs for `ray job submit [OPTIONS] -- WORDS...`: Ray's CLI joins the words after
    `--` with `shlex.join` (on Linux; `list2cmdline` only on Windows) and the head runs the line in a shell.
    `shlex.join` quotes a word `&&`, so a command line with shell operators must be one word given to a
    shell: `-- sh -c 'A && B'`, whose command is returned as `A && B`."""
    if "--" not in words:
        raise ValueError(f"no `--` before the entrypoint in {words!r}")
    rest = words[words.index("--") + 1 :]
    if not rest:
        raise ValueError(f"nothing after `--` in {words!r}")
    if len(rest) == 3 and rest[0] in _SHELLS and rest[1] == "-c":
        return rest[2]
    return shlex.join(rest)


def job_submit_command(line: str) -> str:
    """The entrypoint of a shell line `ray job submit ... -- ...` (backslash continuations allowed)."""
    line = re.sub(r"\\\n", " ", line)  # a shell joins `\<newline>` lines
    raw = shlex.shlex(line, posix=False, punctuation_chars=True)  # keeps quotes: '&&' quoted vs. bare
    raw.whitespace_split = True
    bare = [word for word in raw if word in _OPERATORS]
    if bare:
        raise ValueError(f"unquoted shell operator {bare[0]!r} in {line!r}: the shell would cut the command there")
    words = shlex.split(line, comments=True)
    if words[:3] != ["ray", "job", "submit"]:
        raise ValueError(f"not a `ray job submit` line: {line!r}")
    return after_double_dash(words)


def cronjob_command(cronjob: dict) -> str:
    """The entrypoint the CronJob's container submits: its command + args are `ray job submit ... -- ...`."""
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    words = list(container.get("command", [])) + list(container.get("args", []))
    if words[:3] != ["ray", "job", "submit"]:
        raise ValueError(f"the CronJob's container does not run `ray job submit`: {words!r}")
    return after_double_dash(words)


def crontab_command(block: str) -> str:
    """The command of a crontab entry `m h dom mon dow [cd ... &&] [VAR=... ...] sh -c 'COMMAND' [>> log 2>&1]`.

    `block` holds one entry; comment lines (#) and environment lines (VAR=value) of a crontab are ignored.
    """
    entries = [
        line
        for line in block.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not re.match(r"^\s*[A-Za-z_]\w*\s*=", line)
    ]
    if len(entries) != 1:
        raise ValueError(f"expected one crontab entry, found {len(entries)}: {entries!r}")
    entry = entries[0].strip()
    fields = 1 if entry.startswith("@") else 5
    command = entry.split(None, fields)[fields]
    words = shlex.split(command)
    for i, word in enumerate(words[:-2]):
        if word in _SHELLS and words[i + 1] == "-c":
            return words[i + 2]
    raise ValueError(f"the crontab entry does not run its command with `sh -c '...'`: {entry!r}")


def readme_block(text: str, name: str) -> str:
    """The fenced code block right after the marker `<!-- entrypoint: NAME -->` (exactly one such marker)."""
    pattern = re.compile(r"^<!--\s*entrypoint:\s*" + re.escape(name) + r"\s*-->\s*\n```[^\n]*\n(.*?)^```", re.M | re.S)
    found = pattern.findall(text)
    if len(found) != 1:
        raise ValueError(f"expected one `<!-- entrypoint: {name} -->` marker before a code block, found {len(found)}")
    return found[0]
