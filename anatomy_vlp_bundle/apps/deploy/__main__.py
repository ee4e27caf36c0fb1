# Absolute import: a MONAI Application Package runs this folder as a script (python3 /opt/holoscan/app),
# where relative imports do not work; the bundle is on PYTHONPATH there (monai-deploy package --add).
import sys

from anatomy_vlp_bundle.apps.deploy.app import main

if __name__ == "__main__":
    sys.exit(main())
