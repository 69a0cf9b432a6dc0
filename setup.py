"""Build hook: install the qmail chain programs as scripts that start Python with -I -S.

Everything else about the package is in pyproject.toml, except the manual
pages (``data_files``, at the end). This file exists mainly for one reason:
``relay-ctrl-check`` runs once per SMTP connection, and a console-script
wrapper (``[project.scripts]``) costs the ``site`` machinery and ``re`` on
every run (about twice the start-up of a bare interpreter).
So the ``relay-ctrl-*`` programs are plain scripts whose first line names
the interpreter that builds them (pip runs the build with the target
environment's interpreter) with ``-IS``, and which put the package's
location at the front of ``sys.path`` themselves:

- editable installs (``pip install -e .``): the ``src`` directory here;
- normal installs: the environment's ``purelib`` (site-packages).

If the package is not found there (an unusual ``--target``/``--prefix``
install), the script falls back to running ``site`` and still works, only
slower. pip leaves such a first line alone (it rewrites only ``#!python``).
A wheel built this way names this machine's interpreter: build wheels for
other machines on those machines.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from setuptools import setup
from setuptools.dist import Distribution as _Distribution

from distutils.command.build_scripts import build_scripts  # isort: skip  (after setuptools)

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT_DIR = os.path.join("src", "relaygate", "integrations", "qmail", "scripts")
CHAIN_PROGRAMS = (
    "relay-ctrl-age",
    "relay-ctrl-allow",
    "relay-ctrl-check",
    "relay-ctrl-chdir",
    "relay-ctrl-send",
    "relay-ctrl-udp",
)
PATH_PLACEHOLDER = "sys.path[:0] = []"


class BuildChainScripts(build_scripts):  # type: ignore[misc]
    """Write each chain program with this interpreter and the package path filled in."""

    #: set to True by setuptools' editable_wheel for ``pip install -e``
    editable_mode = False

    def copy_scripts(self) -> tuple[list[str], list[str]]:
        self.mkpath(self.build_dir)
        if self.editable_mode:
            package_path = os.path.join(HERE, "src")
        else:
            package_path = sysconfig.get_path("purelib")
        outfiles = []
        for script in self.scripts:
            with open(script, encoding="utf-8") as f:
                lines = f.read().splitlines(keepends=True)
            if not lines[0].startswith("#!python"):
                raise SystemExit(f"{script}: expected a '#!python' template")
            lines[0] = f"#!{sys.executable} -IS\n"
            text = "".join(lines)
            if PATH_PLACEHOLDER not in text:
                raise SystemExit(f"{script}: no '{PATH_PLACEHOLDER}' line")
            text = text.replace(PATH_PLACEHOLDER, f"sys.path[:0] = [{package_path!r}]", 1)
            out = os.path.join(self.build_dir, os.path.basename(script))
            with open(out, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(out, 0o755)  # noqa: S103 - a program everyone may run, like /usr/bin
            outfiles.append(out)
        return outfiles, outfiles


#: the manual pages, generated from the --help texts (``python -m relaygate.manpages man/man8``;
#: a test keeps them current) and installed into ``<prefix>/share/man/man8``
MAN_PAGES = sorted(os.path.join("man", "man8", name)
                   for name in os.listdir(os.path.join(HERE, "man", "man8"))
                   if name.endswith(".8"))

class Distribution(_Distribution):  # type: ignore[misc]
    """setuptools' editable_wheel installs data files only when the distribution has a
    ``has_data()`` (it has ``has_data_files()``), so ``pip install -e .`` would leave the
    manual pages out; this answers the question it asks."""

    def has_data(self) -> bool:
        return bool(self.has_data_files())


setup(
    distclass=Distribution,
    scripts=[os.path.join(SCRIPT_DIR, name) for name in CHAIN_PROGRAMS],
    data_files=[("share/man/man8", MAN_PAGES)],
    cmdclass={"build_scripts": BuildChainScripts},
    # the templates are build input, not package data
    exclude_package_data={"relaygate.integrations.qmail.scripts": ["*"],
                          "relaygate.integrations.qmail": ["scripts/*"]},
)
