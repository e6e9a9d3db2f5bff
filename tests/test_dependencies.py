"""Dependency floors that exclude releases with published security holes the project is exposed to.

``predict`` and ``evaluate`` load a ``model.keras`` the user names, relying on Keras's ``safe_mode``: no Keras
release below :data:`KERAS_FLOOR` may be admitted, in ``pyproject.toml`` (what CI and the image install) or in
``environment.yml`` (conda), and the one installed here must satisfy it.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# the first release with every published load-time CVE fixed: the safe_mode bypasses CVE-2025-1550 (3.8/3.9),
# CVE-2025-8747 and CVE-2025-9906 (3.11.0), CVE-2025-9905 and CVE-2025-49655 (3.11.3), CVE-2025-12058 (3.12.0),
# CVE-2026-1462 (3.13.2), and the file reads of HDF5 external and virtual datasets CVE-2026-1669 (3.13.2) and
# CVE-2026-12480 (3.14.1; 3.13.x is affected)
KERAS_FLOOR = Version("3.14.1")


def _keras_specifiers() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = {"pyproject.toml": next(str(r.specifier) for r in map(Requirement, project) if r.name == "keras")}
    conda = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    keras = [d.split("#")[0].strip() for d in conda if isinstance(d, str) and re.match(r"keras\s*[<>=!~]", d)]
    assert len(keras) == 1, keras
    specs["environment.yml"] = str(Requirement(keras[0]).specifier)
    return specs


def test_no_keras_release_with_a_safe_mode_bypass_is_admitted():
    for where, spec in _keras_specifiers().items():
        requirement = Requirement(f"keras{spec}")
        admitted = [v for v in ("3.5.0", "3.8.0", "3.11.2", "3.12.0", "3.13.1", "3.13.2", "3.14.0")
                    if requirement.specifier.contains(v)]
        assert not admitted, f"{where}: keras{spec} admits {admitted}"
        assert requirement.specifier.contains(str(KERAS_FLOOR)), f"{where}: keras{spec} refuses {KERAS_FLOOR}"
        assert requirement.specifier.contains(metadata.version("keras")), f"{where}: not what is installed here"
