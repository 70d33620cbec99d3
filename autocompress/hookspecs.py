"""The plugin hooks of autocompress.

Every hook follows the ``register_*(register)`` style: autocompress calls the hook once per plugin with a
``register`` callable, and the plugin calls it for each thing it contributes. The engine validates what it
receives and names the plugin in any error. Built-in techniques (``plugins/`` in this repository) use
exactly these hooks, registered through the ``autocompress`` entry-point group like any third party.

A minimal plugin module::

    from autocompress import hookimpl
    from autocompress.technique import Technique

    class MyTechnique(Technique):
        name = "my_technique"
        ...

    @hookimpl
    def register_techniques(register):
        register(MyTechnique())
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT_NAME = "autocompress"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_techniques(register: Callable[..., None]) -> None:
    """Register compression techniques.

    Call ``register(technique)`` once per technique, where ``technique`` is an instance of
    :class:`autocompress.technique.Technique` (a subclass with ``name``, ``stage``, ``params`` and the
    transform methods it needs). A technique declares its search space (``params``), where it runs in a
    pipeline (``stage``: structural change before recovery training, training-time loss/mask hooks, or a
    post-training transform), what it needs from the engine (``requires``: teacher model, importance data,
    calibration data) and which techniques it cannot be combined with (``incompatible_with``, with a
    reason). The full contract, with a worked example, is in ``docs/plugins.md``.
    """
