"""MONAI Deploy App SDK 4 application: a DICOM CT series in, the bundle's contract result, a DICOM SEG of
the present anatomies' boxes and a Basic Text SR of the report out (:mod:`.app`).

Needs the deploy environment (``bash scripts/deploy_env.sh``): ``monai-deploy-app-sdk``, ``highdicom``.
"""

from . import app as _app
from .app import *  # noqa: F401,F403 - the app module's public names

__all__ = list(_app.__all__)
