"""``${VAR}`` and ``${VAR:-default}`` as a config value: a setting the cluster provides as environment.

The ``cluster`` preset takes ``storage.root`` and ``tracking.uri`` from the ``loomcfm-env`` ConfigMap this
way (every KFP step and Job gets it as environment), so the packages' default config follows the platform
it runs on instead of repeating its bucket and service names. Only a whole value is a reference: text
that merely contains ``${`` stays as it is.
"""

from __future__ import annotations

import os
import re
from typing import Any

from loomcfm_core.errors import ConfigError

_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?\}$")


def expand_env(tree: Any, key: str = "") -> Any:
    """A copy of a config tree with every ``${VAR}`` / ``${VAR:-default}`` value replaced by the variable
    (the default when it is unset or empty, as the shell's ``:-``).

    Args:
        tree: a config tree (or one value of it), as YAML loads it.
        key: the dotted key of ``tree``, for the error that names it.

    Returns:
        The expanded copy; a reference to an unset variable without a default is a ConfigError naming the
        key and the variable, because a silent empty value would send data somewhere unintended.
    """
    if isinstance(tree, dict):
        return {name: expand_env(value, f"{key}.{name}" if key else str(name)) for name, value in tree.items()}
    if isinstance(tree, list):
        return [expand_env(value, key) for value in tree]
    match = _REFERENCE.match(tree.strip()) if isinstance(tree, str) else None
    if match is None:
        return tree
    name, default = match.groups()
    value = os.environ.get(name) or default
    if value is None:
        raise ConfigError(f"{key or 'config'}: {tree} needs the environment variable {name}, which is not set "
                          f"(give a default with ${{{name}:-<value>}} or set it)")
    return value
